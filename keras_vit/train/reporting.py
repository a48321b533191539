"""What a run reports: its callbacks (progress lines, TensorBoard, ``history.csv``), ``report.json``, the plot, the model.

The model is written as soon as training ends (``write_model``), before the final evaluations, so that no
evaluation can lose it; ``report.json`` last (``write_report``), so that a run without one is not finished and
a re-run evaluates again from the final checkpoint without training.

The report's history is the run's ``keras.callbacks.History`` (one row per
evaluation interval), after the rows a resumed run kept from before its
checkpoint (read back from ``history.csv``, which ``CSVLogger`` appends to).
"""

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path

import keras
import numpy as np

import keras_vit
from keras_vit import plotting
from keras_vit.files import atomic_file
from keras_vit.train import data, settings
from keras_vit.train import callbacks as run_callbacks

log = logging.getLogger(__name__)
HISTORY_CSV = "history.csv"
# Temporaries of the writers here (a process killed meanwhile leaves them; the next run in the folder deletes them).
_WEIGHTS_TMP, _MODEL_TMP, _REPORT_TMP, _HISTORY_TMP = ".model.tmp.weights.h5", ".model.tmp.keras", ".report.json.tmp", f".{HISTORY_CSV}.tmp"
TEMPORARIES = (_WEIGHTS_TMP, _MODEL_TMP, _REPORT_TMP, _HISTORY_TMP)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # CSVLogger writes "NA" for a value an epoch did not log


def read_rows(path):
    """The rows of a ``history.csv`` as dicts of floats (None for empty or "NA" cells, ``step`` an int); [] without it."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as file:
        rows = [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(file)]
    for row in rows:
        row.pop("epoch", None)  # the History's rows are keyed by step alone
        row["step"] = int(row["step"])
    return rows


def _keep_rows_until(path, step):
    """Drops the rows of ``path`` after ``step`` (all of them without a checkpoint, ``step`` None)."""
    path = Path(path)
    if not path.exists() or not path.read_text().strip():
        return
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields, kept = reader.fieldnames, [row for row in reader if step and float(row["step"]) <= step]
    with atomic_file(path, temporary=path.with_name(_HISTORY_TMP)) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)


def make_callbacks(config, output_dir, resumed_step, chief=True):
    """``(callbacks, earlier_rows)``: a progress line every ``log_every`` steps; on the chief stock
    ``TensorBoard`` (``output_dir/logs``) and ``CSVLogger`` (``output_dir/history.csv``), one entry per
    evaluation interval. Rows of ``history.csv`` after ``resumed_step`` (the checkpoint this process resumes
    from; None: none) are dropped first; those kept are ``earlier_rows``."""
    progress = [run_callbacks.ProgressLogger(config["log_every"])] if config["log_every"] else []
    if not chief:
        return progress, []
    history = Path(output_dir) / HISTORY_CSV
    _keep_rows_until(history, resumed_step)
    return progress + [
        # epoch summaries only: TensorBoard counts batch summaries from 0 again when a run resumes
        keras.callbacks.TensorBoard(str(Path(output_dir) / "logs")),
        keras.callbacks.CSVLogger(str(history), append=True),
    ], read_rows(history)


def history_rows(history):
    """One dict per epoch (evaluation interval) of a ``keras.callbacks.History``, values as Python numbers."""
    columns = history.history
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    for row in rows:
        row.update({k: float(v) for k, v in row.items() if k != "step"})
        row["step"] = int(row["step"])
    return rows


def top1_by_image_size(model, source, sizes, batch_size):
    """``{"HxW": test top-1}`` of ``model`` on ``source`` (a ``data.Source``) resized to each of ``sizes``: the same
    weights as one model of any image size (``keras_vit.resize_model(model, (None, None))``)."""
    any_size = keras_vit.resize_model(model, (None, None))
    accuracies = {}
    for size in sizes:
        height, width = (size, size) if isinstance(size, int) else size
        hits = count = 0
        for images, labels in data.pipeline(source, [height, width], batch_size, False).as_numpy_iterator():
            predicted = np.asarray(any_size.predict_on_batch(images)).argmax(-1)
            hits += int((predicted == labels.argmax(-1)).sum())
            count += len(labels)
        accuracies[f"{height}x{width}"] = hits / count
    return accuracies


def build_report(config, environment, loop, top1, rows, wall_seconds, class_names=None):
    """The report dict of a finished run (written to ``report.json``); ``class_names``: output index -> name."""
    model = getattr(loop.model, "encoder", loop.model)
    strategy = environment.strategy
    return {
        "top1": top1,  # masked_patch_prediction: accuracy of the mean-colour classes of all patches
        "steps": config["steps"],
        "images_per_second": rows[-1]["images_per_second"] if rows else None,
        "wall_seconds": wall_seconds,
        "backend": environment.backend,
        "loop": environment.loop,
        "strategy": type(strategy).__name__ if strategy is not None else environment.distribution and config["strategy"],
        "replicas": environment.replicas,
        "precision": environment.precision,
        "engine": dataclasses.asdict(environment.engine) if environment.engine else None,
        "parameters": model.count_params(),
        "trainable_parameters": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
        "class_names": class_names,  # keras_vit.decode_predictions(scores, class_names=report["class_names"])
        "config": config,
        "history": rows,
    }


def plot_history(rows, path):
    """The training curves as a PNG (``keras_vit.plotting``); without matplotlib a warning and no file."""
    try:
        return plotting.plot_training_curves(rows, path)
    except ImportError as error:
        log.warning("No training plot: %s", error)
        return None


def write_model(output_dir, model):
    """Writes ``output_dir/model.keras`` atomically: the trained ``model`` as a twin without what training attached
    to it (``compile``'s configuration, which names the training application's schedule, loss and metrics, and the
    optimizer with its slots), so that it loads with the model library alone, as keras.applications models do. The
    training state lives in the run's checkpoints. Returns the path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights, temporary = output_dir / _WEIGHTS_TMP, output_dir / _MODEL_TMP
    try:
        twin = type(model).from_config(model.get_config())
        if [tuple(v.shape) for v in twin.weights] == [tuple(v.shape) for v in model.weights]:
            twin.set_weights(model.get_weights())  # after fit the model holds the EMA weights (with EMA)
        else:  # LoRA factors: Keras' own save_weights merges them into the kernels
            model.save_weights(weights)
            twin.load_weights(weights)
        twin.save(temporary)
        os.replace(temporary, output_dir / "model.keras")
    finally:
        for path in (weights, temporary):
            path.unlink(missing_ok=True)
    return output_dir / "model.keras"


def check_image_sizes(model, sizes):
    """Raises ``SettingError`` naming ``eval_image_sizes`` when ``model`` cannot take one of ``sizes`` (its
    architecture's rules: sides that are multiples of the token stride, unless it pads): before training."""
    for size in sizes or ():
        height, width = (size, size) if isinstance(size, int) else size
        try:
            model.architecture.replace(image_size=(height, width))
        except ValueError as error:
            raise settings.SettingError(
                f"eval_image_sizes={sizes!r} is not allowed for this model: {error}", "eval_image_sizes", sizes
            ) from None


def write_report(output_dir, report):
    """Writes ``report.json`` (atomically) and ``training.png`` into ``output_dir``."""
    output_dir = Path(output_dir)
    with atomic_file(output_dir / "report.json", temporary=output_dir / _REPORT_TMP) as temporary:
        temporary.write_text(json.dumps(report, indent=2, default=str))
    plot_history(report["history"], output_dir / "training.png")
    log.info("top-1 %.4f after %d steps; wrote %s and report.json", report["top1"], report["steps"], output_dir / "model.keras")
