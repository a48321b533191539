"""The recipe runner: a configuration dict in, a trained model, logs and a JSON report out.

``run(config)`` checks every setting (``keras_vit.train.settings``) first,
locks the output folder against a second live run, refuses checkpoints of
other training settings (``keras_vit.train.run_folder``; settings stored by
an older schema version are upgraded first), skips a run that is already
finished, and otherwise trains (``keras_vit.train.building``) and reports
(``keras_vit.train.reporting``). Outputs under ``output_dir``:
``checkpoints/`` (resume by re-running the same command), ``logs/``
(TensorBoard), ``history.csv``, ``model.keras``, ``report.json``,
``training.png`` (with matplotlib), ``settings.json`` (the training
settings the checkpoints were written with) and, while a run is live, ``.lock``.
"""

import json
import logging
import time
from pathlib import Path

import keras

from keras_vit.train import building, checkpointing, distribute, jax_distribute, reporting, run_folder, settings

log = logging.getLogger(__name__)


def task_folder(config):
    """Where this process keeps its checkpoints: ``output_dir``, or ``output_dir/workers/worker_<i>`` for a
    multi-worker task that is not the chief (as ``Trainer.fit``). The processes of a JAX run share the checkpoints
    of ``output_dir`` (process 0 writes them); the others hold their lock and settings in
    ``output_dir/workers/process_<i>``."""
    output_dir = Path(config["output_dir"])
    if config["strategy"] in jax_distribute.STRATEGIES:
        index = jax_distribute.process()[0]
        return output_dir if index == 0 else output_dir / "workers" / f"process_{index}"
    cluster = keras.backend.backend() == "tensorflow" and config["strategy"] in ("auto", "multi_worker")
    task = distribute.cluster_task() if cluster else None
    if task is None or task.chief:
        return output_dir
    return output_dir / "workers" / f"worker_{task.index}"


def _checkpoints(folder):
    return checkpointing.CheckpointManager(Path(folder) / "checkpoints")


def _remove_temporaries(folder):
    """Deletes the temporaries a killed run left in ``folder`` (kill -9 between writing one and renaming it into
    place). Called under the folder's lock: no live run writes there."""
    for name in run_folder.TEMPORARIES + reporting.TEMPORARIES:
        (Path(folder) / name).unlink(missing_ok=True)
    _checkpoints(folder).remove_temporaries()


def _loop_of_history(folder):
    """The loop that wrote ``folder/history.csv`` (``Trainer`` logs ``grad_norm``, Keras' fit loop does not), or
    None: for folders written before ``settings.json`` named it."""
    path = Path(folder) / reporting.HISTORY_CSV
    header = path.read_text().partition("\n")[0].split(",") if path.exists() else []
    return ("trainer" if "grad_norm" in header else "fit") if "step" in header else None


def _check_loop(folder, loop):
    """Refuses (``LoopMismatchError``) checkpoints written by another training loop than ``loop`` (a ``written_by``
    dict): the loops log other columns and compute the steps otherwise."""
    stored = run_folder.written_by(folder)
    if stored is None:
        found = _loop_of_history(folder)
        stored = {"loop": found, "backend": "tensorflow" if found == "trainer" else None} if found else None
    if stored is not None and stored.get("loop") != loop["loop"]:
        raise run_folder.LoopMismatchError(folder, stored, loop)


def open_folder(folder, config, loop=None):
    """The run id of ``folder`` for ``config``: a new one (settings stored) when it holds no checkpoint, else
    the id its checkpoints carry once its stored settings equal ``config``'s (``SettingsMismatchError`` otherwise)
    and they were written by ``loop`` (``{"loop", "backend"}``; ``LoopMismatchError`` otherwise).

    A folder whose ``settings.json`` is missing or unreadable resumes when its checkpoints carry this
    configuration's run id (the file is written again), and is refused otherwise."""
    training = settings.training_settings(config)
    latest = _checkpoints(folder).latest_checkpoint
    if latest is None:
        return run_folder.store_settings(folder, training, loop=loop)
    if run_folder.stored_settings(folder) is None:
        run, found = run_folder.run_id(training), _checkpoint_run_id(latest)
        if found != run:
            raise run_folder.SettingsMismatchError(
                folder, [f"settings.json is missing or unreadable and the checkpoints carry run {found}, this "
                         f"configuration is run {run}"])
    else:
        run = run_folder.check_settings(folder, training)
        if run is None:  # stored before settings had a version: the checkpoints hold the run id
            run = _checkpoint_run_id(latest)
    if loop is not None:
        _check_loop(folder, loop)
    if run_folder.written_by(folder) is None:  # written by an older keras_vit, or unreadable: written again
        run_folder.store_settings(folder, training, run, loop=loop)
    return run


def _checkpoint_run_id(checkpoint):
    """The run id stored with ``checkpoint`` (its ``state.json``), or None when it cannot be read."""
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _finished_report(config, run):
    """The report of a finished single-process run ``run`` in ``output_dir`` (None when there is none).

    A finished run has its final checkpoint (same run id) and its report.json. Multi-worker runs are
    not skipped: every task must take part in the final evaluation, so they re-evaluate instead.
    """
    output_dir = Path(config["output_dir"])
    latest = _checkpoints(output_dir).latest_checkpoint
    several = distribute.cluster_task() is not None or jax_distribute.process()[1] > 1
    if not (output_dir / "report.json").exists() or latest is None or several:
        return None
    if not (latest / "state.json").exists():
        return None
    state = json.loads((latest / "state.json").read_text())
    if state.get("step") != config["steps"] or state.get("run_id") != run:
        return None
    return json.loads((output_dir / "report.json").read_text())


def run(config):
    """Trains as ``config`` says; returns the report dict (also written to ``output_dir/report.json``).

    A run whose ``output_dir`` already holds its final checkpoint and report is not redone: the stored
    report comes back, with ``"already_finished": True``.
    """
    backend = keras.backend.backend()
    settings.validate(config, backend)
    if config["strategy"] in jax_distribute.STRATEGIES:
        jax_distribute.initialize_processes()  # this process's place in the run decides its folder
    folder = task_folder(config)
    with run_folder.lock(folder):
        _remove_temporaries(folder)
        run_id = open_folder(folder, config, {"loop": settings.resolve_loop(config["loop"], backend), "backend": backend})
        finished = _finished_report(config, run_id)
        if finished is not None:
            log.info(
                "%s already holds this finished run (top-1 %.4f after %d steps): nothing to do; report.json, "
                "history.csv and model.keras are kept. Use another output_dir to train again.",
                config["output_dir"], finished["top1"], finished["steps"],
            )
            return {**finished, "already_finished": True}
        return _train(config, folder, run_id)


def _train(config, folder, run_id):
    output_dir = Path(config["output_dir"])
    environment = building.setup(config)
    with environment.distributed():  # a JAX strategy's layouts, from building the model to the last evaluation
        loop, prepared = building.assemble(config, environment)
        trained = getattr(loop.model, "encoder", loop.model)  # what the run delivers (masked patch prediction's encoder)
        reporting.check_image_sizes(trained, config["eval_image_sizes"])
        callbacks, earlier = reporting.make_callbacks(config, output_dir, _checkpoints(folder).latest_step(),
                                                      environment.chief)
        started = time.perf_counter()
        history = loop.fit(
            prepared.train_dataset,
            config["steps"],
            eval_dataset=prepared.eval_dataset,
            eval_every=config["eval_every"],
            callbacks=callbacks,
            checkpoint_dir=output_dir / "checkpoints",
            checkpoint_every=config["checkpoint_every"],
            run_id=run_id,
        )
    model = jax_distribute.saveable(trained)  # every process gathers; outside the distribution
    if environment.chief:
        reporting.write_model(output_dir, model)  # first: no evaluation below can lose the trained model
    with environment.distributed():
        top1 = loop.evaluate(prepared.eval_dataset)
    rows = earlier + reporting.history_rows(history)
    report = reporting.build_report(config, environment, loop, top1, rows, time.perf_counter() - started,
                                    prepared.train.class_names)
    if config["eval_image_sizes"]:
        report["top1_by_image_size"] = reporting.top1_by_image_size(
            loop.model, prepared.eval, config["eval_image_sizes"], config["batch_size"]
        )
    if environment.chief:
        reporting.write_report(output_dir, report)
    return report
