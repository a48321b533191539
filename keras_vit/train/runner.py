"""The recipe runner: a configuration dict in, a trained model, logs and a JSON report out.

``recipes/finetune.py`` and ``recipes/pretrain.py`` call ``main`` with their
defaults (``FINETUNE`` / ``PRETRAIN``), a preset from ``keras_vit/train/presets/`` and
``key=value`` overrides. Every key is documented in ``COMMON``. Outputs under
``output_dir``: ``checkpoints/`` (resume by re-running the same command),
``logs/`` (TensorBoard), ``history.csv``, ``model.keras``, ``report.json``
and, with matplotlib installed, ``training.png``; ``settings.json`` (the
settings the checkpoints were written with) and, while a run is live,
``.lock``. Settings are checked by ``keras_vit.train.settings`` first.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from keras_vit.train import run_folder, settings

log = logging.getLogger(__name__)
DEFAULT_MODEL = "B/16"
COMMON = {
    "task": "classify",  # classify | masked_patch_prediction (self-supervised, keras_vit.ssl)
    "model": None,  # model name (keras_vit.create_model); None: the architecture of a .keras weights file, else B/16
    "model_overrides": {},  # vision_transformer keyword arguments, e.g. {"dropout_rate": 0.1}
    "weights": None,  # None, a family ("augreg_in21k"), a checkpoint path or URL
    "image_size": 224,
    "dataset": "digits",  # "digits", "folder:PATH" (PATH/<split>/<class>/*.jpg) or a TFDS name
    "classes": None,  # image folders: class folder names in label order, for every split (None: the train split's)
    "channels": None,  # image folders: 1 or 3 (None: the model's channel count)
    "skip_undecodable": False,  # image folders: skip files that are not JPEG/PNG images (counted and logged) instead of failing
    "train_split": "train",
    "eval_split": "test",
    "data_dir": None,  # TFDS data_dir
    "download": False,  # let TFDS download and prepare the dataset
    "batch_size": 512,  # global batch
    "steps": 10_000,
    "warmup_steps": 500,
    "base_lr": 0.01,
    "decay": "cosine",  # cosine | linear | constant
    "linear_end": 1e-5,
    "optimizer": "sgd",  # sgd | adam
    "momentum": 0.9,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "weight_decay": 0.0,  # decoupled (AdamW-style)
    "grad_clip": 1.0,  # global norm of the full-batch gradient; None: off
    "accumulation_steps": 1,
    "label_smoothing": 0.0,
    "ema_decay": None,  # Polyak averaging, e.g. 0.9999; evaluation uses the averaged weights
    "mixup_alpha": 0.0,
    "randaugment": None,  # [num_ops, magnitude]
    "crop_area": [0.05, 1.0],  # inception crop area range; None: no crop
    "flip": True,
    "precision": "auto",  # auto (bf16 on TPU and bf16-capable CPUs, fp16 on GPU, else f32) | float32 | mixed_bfloat16 | mixed_float16
    "jit_compile": "auto",
    "steps_per_execution": 1,
    "strategy": "auto",  # auto | default | mirrored | multi_worker | tpu
    "tpu": None,
    "cluster_timeout": 300,  # seconds a multi-worker task waits for the other tasks of TF_CONFIG to start
    "seed": 0,
    "deterministic": False,  # deterministic TF ops (slower); resumed runs then equal uninterrupted ones
    "shuffle_buffer": 10_000,
    "cache": True,
    "eval_every": 500,
    "checkpoint_every": 500,
    "log_every": 50,
    "output_dir": "runs/vit",
}
# The official fine-tuning: SGD momentum 0.9, clipping at 1, batch 512, no weight decay, warmup 500, cosine, 384 px.
FINETUNE = COMMON | {"optimizer": "sgd", "image_size": 384, "weights": "augreg_in21k"}
# The seed's pre-training: Adam (0.9, 0.999), batch 4096, weight decay 0.1, 10k warmup, linear decay, dropout 0.1.
# The seed's masked patch prediction: Adam, lr 2e-4, batch 4096, 10k warmup, cosine decay, 1M steps (JFT).
PRETRAIN_SSL = COMMON | {
    "task": "masked_patch_prediction",
    "optimizer": "adam",
    "base_lr": 2e-4,
    "batch_size": 4096,
    "warmup_steps": 10_000,
    "decay": "cosine",
    "steps": 1_000_000,
    "weights": None,
}
PRETRAIN = COMMON | {
    "optimizer": "adam",
    "base_lr": 1e-3,
    "batch_size": 4096,
    "weight_decay": 0.1,
    "warmup_steps": 10_000,
    "decay": "linear",
    "steps": 300_000,
    "weights": None,
    "model_overrides": {"dropout_rate": 0.1},
}
# Presets are package data: found in an installed wheel as in a checkout.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def parse_value(text):
    """JSON when it parses (numbers, null, lists, dicts, true/false), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(defaults, preset=None, overrides=()):
    """``defaults`` updated by a preset (a JSON file path or a name in keras_vit/train/presets/) and ``key=value`` overrides."""
    config = dict(defaults)
    if preset:
        path = Path(preset)
        if not path.exists():
            path = PRESETS_DIR / f"{preset}.json"
        if not path.exists():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ValueError(f"Unknown preset {preset!r}: give a JSON file or one of {', '.join(known)}.")
        try:
            preset_settings = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"Preset {path} is not valid JSON: {error}.") from None
        if not isinstance(preset_settings, dict):
            raise ValueError(f"Preset {path} must be a JSON object of settings, got {type(preset_settings).__name__}.")
        config.update(preset_settings)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"Overrides are key=value, got {override!r}.")
        if key.startswith("model_overrides."):
            config["model_overrides"] = {**config["model_overrides"], key.split(".", 1)[1]: parse_value(value)}
            continue
        if key not in defaults:
            raise ValueError(f"Unknown setting {key!r}. Settings: {', '.join(sorted(defaults))}.")
        config[key] = parse_value(value)
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)} in the preset. Settings: {', '.join(sorted(defaults))}.")
    settings.validate(config)
    if config["model"] is None and not _is_keras_file(config["weights"]):
        config["model"] = DEFAULT_MODEL  # without a .keras file to take the architecture from
    clashing = {"image_size", "classes", "include_top", "weights"} & set(config["model_overrides"])
    if clashing:
        raise ValueError(f"Set {sorted(clashing)} as top-level settings, not in model_overrides.")
    return config


def _precision(choice, strategy):
    from keras_vit.train import distribute

    return distribute.default_precision(strategy) if choice == "auto" else choice


REPORTING_SETTINGS = ("output_dir", "eval_every", "checkpoint_every", "log_every", "cluster_timeout")


def run_id(config):
    """A short hash of the settings that change training (``training_settings``)."""
    import hashlib

    return hashlib.sha256(json.dumps(training_settings(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


def setup(config):
    """Seeds, determinism, strategy and precision policy name for ``config``; returns ``(strategy, precision)``.

    The precision is applied to the model only (``build_trainer``), not to Keras' global dtype policy.
    """
    import keras
    import tensorflow as tf

    from keras_vit.train import distribute

    keras.utils.set_random_seed(config["seed"])
    if config["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.get_strategy(config["strategy"], config["tpu"], cluster_timeout=config["cluster_timeout"])
    precision = _precision(config["precision"], strategy)
    return strategy, precision


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy is ``name`` inside the context and what it was after (layers keep theirs)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _is_keras_file(weights):
    return isinstance(weights, str) and weights.endswith(".keras")


def _architecture_from_file(config):
    """True when the model comes from a ``.keras`` weights file: ``weights`` is one and ``model`` is unset."""
    return config["model"] is None and _is_keras_file(config["weights"])


def folder_channels(config):
    """The channel count image folders decode to: ``channels``, else the model's (overrides, a .keras file) or 3."""
    if config["channels"] is not None:
        return config["channels"]
    if "channels" in config["model_overrides"]:
        return config["model_overrides"]["channels"]
    if _architecture_from_file(config):
        import keras

        return int(keras.models.load_model(config["weights"]).input.shape[-1])
    return 3


def prepare_data(config):
    """``(train_source, train_dataset(skip_batches), eval_dataset)`` for ``config``.

    Image folders: both splits take their labels from one class list (``classes``, else the train split's).
    """
    from keras_vit.train import data

    folder = {}
    if config["dataset"].startswith("folder:"):
        folder = dict(classes=config["classes"], channels=folder_channels(config), skip_undecodable=config["skip_undecodable"])
    train_source = data.load_source(config["dataset"], config["train_split"], config["data_dir"], config["download"], **folder)
    if folder:
        folder["classes"] = train_source.class_names
    eval_source = data.load_source(config["dataset"], config["eval_split"], config["data_dir"], config["download"], **folder)

    def train_dataset(skip_batches=0):
        return data.pipeline(
            train_source,
            config["image_size"],
            config["batch_size"],
            True,
            config["seed"],
            mixup_alpha=config["mixup_alpha"],
            randaugment=config["randaugment"],
            crop_area=config["crop_area"],
            flip=config["flip"],
            cache=config["cache"],
            shuffle_buffer=config["shuffle_buffer"],
            skip_batches=skip_batches,
        )

    eval_dataset = data.pipeline(eval_source, config["image_size"], config["batch_size"], False, cache=config["cache"])
    return train_source, train_dataset, eval_dataset


def build_model(config, num_classes):
    """The model ``config`` describes, with its weights (build it under the strategy's scope).

    With ``model`` unset and a ``.keras`` file as ``weights``, the architecture is the file's
    (``keras_vit.from_official_checkpoint``); otherwise ``keras_vit.create_model(model or "B/16")``.
    """
    import keras_vit

    include_top = config["task"] != "masked_patch_prediction"
    if _architecture_from_file(config):
        log.info("Architecture from %s (no model setting given).", config["weights"])
        return keras_vit.from_official_checkpoint(
            config["weights"], image_size=config["image_size"], classes=num_classes, include_top=include_top,
            **config["model_overrides"],
        )
    return keras_vit.create_model(
        config["model"] or DEFAULT_MODEL,
        weights=config["weights"],
        image_size=config["image_size"],
        classes=num_classes,
        include_top=include_top,
        **config["model_overrides"],
    )


def build_trainer(config, strategy, precision, num_classes):
    """The model (with its weights) and a ``Trainer`` for it, built under ``strategy``.

    For ``task="masked_patch_prediction"`` the trained model is a
    ``keras_vit.ssl.MaskedPatchPrediction`` around an encoder without head.
    """
    from keras_vit import ssl
    from keras_vit.train import trainer as training

    self_supervised = config["task"] == "masked_patch_prediction"
    with strategy.scope(), dtype_policy(precision):
        model = build_model(config, num_classes)
        if self_supervised:
            model = ssl.MaskedPatchPrediction(model, seed=config["seed"])
        schedule = training.WarmupDecay(
            config["base_lr"], config["steps"], config["warmup_steps"], config["decay"], config["linear_end"]
        )
        optimizer = training.make_optimizer(
            config["optimizer"],
            schedule,
            momentum=config["momentum"],
            beta_1=config["beta_1"],
            beta_2=config["beta_2"],
            weight_decay=config["weight_decay"],
            ema_decay=config["ema_decay"],
            loss_scale=precision == "mixed_float16",
        )
    return training.Trainer(
        model,
        optimizer,
        strategy,
        config["batch_size"],
        grad_clip=config["grad_clip"],
        accumulation_steps=config["accumulation_steps"],
        label_smoothing=config["label_smoothing"],
        steps_per_execution=config["steps_per_execution"],
        jit_compile=config["jit_compile"],
        loss_fn=model.loss_and_accuracy if self_supervised else None,
    )


def task_folder(config):
    """Where this process keeps its checkpoints: ``output_dir``, or ``output_dir/workers/worker_<i>`` for a
    multi-worker task that is not the chief (as ``Trainer.fit``)."""
    from keras_vit.train import distribute

    output_dir = Path(config["output_dir"])
    task = distribute.cluster_task() if config["strategy"] in ("auto", "multi_worker") else None
    if task is None or task.chief:
        return output_dir
    return output_dir / "workers" / f"worker_{task.index}"


def training_settings(config):
    """The settings that change training (not where or how often it reports): what a checkpoint folder remembers."""
    return {k: v for k, v in config.items() if k not in REPORTING_SETTINGS}


def _final_checkpoint(folder, config):
    """The state of ``folder``'s latest checkpoint when it is the last step of this configuration's run, else None."""
    from keras_vit.train import checkpointing

    latest = checkpointing.CheckpointManager(Path(folder) / "checkpoints").latest_checkpoint
    if latest is None or not (latest / "state.json").exists():
        return None
    state = json.loads((latest / "state.json").read_text())
    return state if state.get("step") == config["steps"] and state.get("run_id") == run_id(config) else None


def _finished_report(config):
    """The report of a finished single-process run of ``config`` in ``output_dir`` (None when there is none).

    A finished run has its final checkpoint (same settings) and its report.json. Multi-worker runs are
    not skipped: every task must take part in the final evaluation, so they re-evaluate instead.
    """
    from keras_vit.train import distribute

    report_path = Path(config["output_dir"]) / "report.json"
    if not report_path.exists() or distribute.cluster_task() is not None:
        return None
    if _final_checkpoint(config["output_dir"], config) is None:
        return None
    return json.loads(report_path.read_text())


def _check_settings(folder, config):
    """Refuses checkpoints of other settings (naming them); remembers this run's settings for the next check."""
    from keras_vit.train import checkpointing

    has_checkpoint = checkpointing.CheckpointManager(Path(folder) / "checkpoints").latest_checkpoint is not None
    if has_checkpoint and run_folder.stored_settings(folder) is not None:
        run_folder.check_settings(folder, training_settings(config))
    elif not has_checkpoint:
        run_folder.store_settings(folder, training_settings(config))


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None  # CSVLogger writes "NA" for a value an epoch did not log


def read_history(path):
    """The rows of a ``history.csv`` as dicts of floats (None for empty or "NA" cells); [] when the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    header, *rows = path.read_text().splitlines()
    keys = header.split(",")
    history = []
    for row in rows:
        record = {k: _number(v) for k, v in zip(keys, row.split(","))}
        record["step"] = int(record["step"])
        history.append(record)
    return history


def run(config):
    """Trains as ``config`` says; returns the report dict (also written to ``output_dir/report.json``).

    Every setting is checked first (``keras_vit.train.settings``); the output folder is then locked
    against a second live run. A run whose ``output_dir`` already holds its final checkpoint and
    report is not redone: the stored report comes back, with ``"already_finished": True``.
    """
    settings.validate(config)
    with run_folder.lock(task_folder(config)):
        finished = _finished_report(config)
        if finished is not None:
            log.info(
                "%s already holds this finished run (top-1 %.4f after %d steps): nothing to do; report.json, "
                "history.csv and model.keras are kept. Use another output_dir to train again.",
                config["output_dir"], finished["top1"], finished["steps"],
            )
            return {**finished, "already_finished": True}
        _check_settings(task_folder(config), config)
        return _train(config)


def _train(config):
    from keras_vit.train import distribute

    output_dir = Path(config["output_dir"])
    strategy, precision = setup(config)
    train_source, train_dataset, eval_dataset = prepare_data(config)
    trainer = build_trainer(config, strategy, precision, train_source.num_classes)
    model = getattr(trainer.model, "encoder", trainer.model)  # what is saved: the encoder after self-supervision
    started = time.perf_counter()
    history = trainer.fit(
        train_dataset,
        config["steps"],
        eval_dataset=eval_dataset,
        eval_every=config["eval_every"],
        callbacks=make_callbacks(config, output_dir, distribute.is_chief(strategy)),
        checkpoint_dir=output_dir / "checkpoints",
        checkpoint_every=config["checkpoint_every"],
        run_id=run_id(config),
    )
    history = [dict(zip(history.history, values)) for values in zip(*history.history.values())]  # one row per epoch
    top1 = trainer.evaluate(eval_dataset)
    chief = distribute.is_chief(strategy)
    history = read_history(output_dir / "history.csv") if chief else history  # every row, also those before a resume
    report = {
        "top1": top1,  # masked_patch_prediction: accuracy of the mean-colour classes of all patches
        "steps": config["steps"],
        "images_per_second": history[-1]["images_per_second"] if history else None,
        "wall_seconds": time.perf_counter() - started,
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "precision": precision,
        "parameters": model.count_params(),
        "class_names": train_source.class_names,  # output index -> name (keras_vit.decode_predictions(class_names=))
        "config": config,
        "history": history,
    }
    if chief:
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save(output_dir / ".model.tmp.keras")  # after fit the model holds the EMA weights (with EMA)
        os.replace(output_dir / ".model.tmp.keras", output_dir / "model.keras")
        (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        plot_history(history, output_dir / "training.png")
        log.info("top-1 %.4f after %d steps; wrote %s and report.json", top1, config["steps"], output_dir / "model.keras")
    return report


def make_callbacks(config, output_dir, chief=True):
    """The runner's callbacks: a progress line every ``log_every`` steps; on the chief stock ``TensorBoard``
    (``output_dir/logs``) and ``CSVLogger`` (``output_dir/history.csv``), each one entry per evaluation
    interval (rows after the checkpoint a resumed run starts from are dropped first)."""
    import keras

    from keras_vit.train import callbacks, checkpointing

    progress = [callbacks.ProgressLogger(config["log_every"])] if config["log_every"] else []
    if not chief:
        return progress
    history = Path(output_dir) / "history.csv"
    _drop_rows_after(history, checkpointing.CheckpointManager(Path(output_dir) / "checkpoints").latest_step())
    return progress + [
        # epoch summaries only: TensorBoard counts batch summaries from 0 again when a run resumes
        keras.callbacks.TensorBoard(str(Path(output_dir) / "logs")),
        keras.callbacks.CSVLogger(str(history), append=True),
    ]


def _drop_rows_after(path, step):
    if not path.exists() or not path.read_text().strip():
        return
    header, *rows = path.read_text().splitlines()
    column = header.split(",").index("step")
    kept = [row for row in rows if step and float(row.split(",")[column]) <= step]
    path.write_text("\n".join([header, *kept]) + "\n")


def plot_history(history, path):
    """Loss and accuracy curves as a PNG (skipped, with a note, when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install keras3-vit[plots]).")
        return None
    steps = [r["step"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r["loss"] for r in history])
    left.set(xlabel="step", ylabel="training loss")
    right.plot(steps, [r["accuracy"] for r in history], label="train")
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    right.plot([r["step"] for r in evaluated], [r["val_accuracy"] for r in evaluated], "o-", label="eval")
    right.set(xlabel="step", ylabel="top-1", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(defaults, description, argv=None):
    """Command line of the recipes: ``[--preset NAME|FILE] [--output-dir DIR] [key=value ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", help="a JSON file or a preset name in keras_vit/train/presets/")
    parser.add_argument("--output-dir", help="where checkpoints, logs, model and report go")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("overrides", nargs="*", help="key=value settings (JSON values), e.g. base_lr=0.003")
    args = parser.parse_args(argv)
    try:
        config = load_config(defaults, args.preset, args.overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.output_dir:
        config["output_dir"] = args.output_dir
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    _show_logs()
    try:
        run(config)
    except (run_folder.FolderInUseError, run_folder.SettingsMismatchError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _show_logs():
    """The command line shows keras_vit's INFO lines (progress, adaptations) when nothing else handles them."""
    logger = logging.getLogger("keras_vit")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(format="%(name)s: %(message)s")
        logger.setLevel(logging.INFO)

