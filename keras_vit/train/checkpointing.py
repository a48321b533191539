"""Training checkpoints keyed by ``variable.path``: written atomically, the last N kept, restored by name.

Why not a stock part (checked with Keras 3.15 / TensorFlow 2.21, see the tests):
``tf.train.Checkpoint(model=model, optimizer=optimizer).save()`` stores no
entry under ``model/`` at all (the trainable weights only reach it through the
optimizer, keyed by list index, and the dropout seed states not at all), and
``model.save_weights`` (``.weights.h5``) leaves the seed-generator states out,
so a resumed run would draw other dropout masks. Here every variable of the
model (seed states included) and of the optimizer (iteration, slots, EMA
averages, loss scale) is stored under its unique Keras ``variable.path``,
except for the two parts of a path that Keras numbers per process (so that they
differ between a run and its resumption, or between two models in one process):
an optimizer's name (``adam``, ``adam_1``, ...) is replaced by its role
(``optimizer``, ``inner_optimizer`` inside a ``LossScaleOptimizer``), and the
seed-generator states, which Keras names ``seed_generator_<n>`` process-wide
rather than inside their layer, are numbered in the model's variable order
(``seed_generator_state/<k>``; all are int (2,) arrays).

Layout, as ``tf.train.CheckpointManager`` names it: ``folder/ckpt-<step>/``
with ``model.npz``, ``optimizer.npz`` and ``state.json`` (the step, the
position in the data stream, a run id and the SHA-256 of both arrays files);
``folder/checkpoint`` names the newest. A checkpoint is written into a
temporary folder and renamed into place, so a crash never leaves half of one.

In a run of several JAX processes every process takes part in ``save`` (the
variables' parts are gathered) and process 0 writes; every process restores
from the same folder.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import keras
import numpy as np

from keras_vit.files import atomic_file, sha256_of
from keras_vit.train.jax_distribute import host_array, process

log = logging.getLogger(__name__)
PARTS = ("model", "optimizer")
PREFIX = "ckpt-"


class IncompatibleCheckpointError(ValueError):
    """A checkpoint does not fit the model or optimizer it is restored into (names, shapes or run id).

    Fields: ``path`` (the checkpoint folder); ``part`` (``"model"`` or ``"optimizer"``; None for another run),
    ``missing`` and ``unexpected`` (variable paths, sorted), ``mis_shaped`` (``(path, stored shape, variable
    shape)``); ``run_id`` and ``stored_run_id`` (the run restoring and the run that wrote it).
    """

    def __init__(self, message, path, part=None, missing=(), unexpected=(), mis_shaped=(), run_id=None,
                 stored_run_id=None):
        self.path, self.part, self.run_id, self.stored_run_id = Path(path), part, run_id, stored_run_id
        self.missing, self.unexpected, self.mis_shaped = sorted(missing), sorted(unexpected), list(mis_shaped)
        super().__init__(message)


_LEGACY_PROJECTION = re.compile(r"^(.*/MultiHeadDotProductAttention_\d+)/(query|key|value|out)_(kernel|bias)$")


def current_variable_path(path):
    """Today's ``variable.path`` for one written by keras_vit <= 0.1.0 at 410d757, whose attention layers held their
    projections as variables (``.../MultiHeadDotProductAttention_1/query_kernel`` is now
    ``.../MultiHeadDotProductAttention_1/query/kernel``); other paths unchanged."""
    return _LEGACY_PROJECTION.sub(r"\1/\2/\3", path)


SEED_STATE = re.compile(r"seed_generator(_\d+)?/seed_generator_state")


def model_variables(model):
    """``{key: variable}`` of every model variable: its ``path``; seed-generator states numbered in order."""
    keys, seeds = [], 0
    for variable in model.variables:
        if SEED_STATE.fullmatch(variable.path):
            keys.append(f"seed_generator_state/{seeds}")
            seeds += 1
        else:
            keys.append(variable.path)
    return _unique(keys, model.variables, "model")


def optimizer_variables(optimizer):
    """``{key: variable}`` of every optimizer variable: its ``path`` with the optimizer's name replaced by its role."""
    roles = {optimizer.name: "optimizer"}
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer
    if inner is not None:
        roles[inner.name] = "inner_optimizer"
    keys = []
    for variable in optimizer.variables:
        owner, _, rest = variable.path.partition("/")
        keys.append(f"{roles[owner]}/{rest}" if owner in roles and rest else variable.path)
    return _unique(keys, optimizer.variables, "optimizer")


def _unique(keys, variables, what):
    by_key = {}
    for key, variable in zip(keys, variables):
        if key in by_key:
            raise ValueError(f"Two {what} variables share the path {key!r}: give the layers unique names.")
        by_key[key] = variable
    return by_key


def read(path, part="model"):
    """``{key: array}`` (keys: see ``model_variables``, ``optimizer_variables``) of ``model.npz`` or ``optimizer.npz`` in the checkpoint folder ``path``.

    Keys written by an earlier keras_vit are read under today's variable paths (``current_variable_path``).
    """
    with np.load(Path(path) / f"{part}.npz", allow_pickle=False) as arrays:
        return {current_variable_path(name): arrays[name] for name in arrays.files}


def read_state(path):
    """The ``state.json`` of a checkpoint after checking both arrays files against their stored SHA-256.

    Raises ``OSError`` or ``ValueError`` for a missing, truncated or altered checkpoint.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    for part in PARTS:
        if sha256_of(path / f"{part}.npz") != state["sha256"][part]:
            raise ValueError(f"{path / f'{part}.npz'} does not match its SHA-256 in state.json (corrupted).")
    return state


class CheckpointManager:
    """Saves, lists, rotates and restores name-keyed checkpoints in ``folder`` (the last ``max_to_keep``).

    ``save(model, optimizer, step, stream_position, run_id)`` writes ``ckpt-<step>``;
    ``restore(model, optimizer, run_id)`` loads the newest readable one and
    returns its state dict (``step``, ``stream_position``, ``run_id``) or None.
    """

    def __init__(self, folder, max_to_keep=2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}.")
        self.folder = Path(folder)
        self.max_to_keep = max_to_keep

    @property
    def checkpoints(self):
        """Checkpoint folders, oldest first (as ``tf.train.CheckpointManager.checkpoints``)."""
        if not self.folder.is_dir():
            return []
        steps = sorted(int(p.name[len(PREFIX):]) for p in self.folder.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit())
        return [self.folder / f"{PREFIX}{step}" for step in steps]

    @property
    def latest_checkpoint(self):
        """The newest checkpoint folder named by ``folder/checkpoint``, or None."""
        pointer = self.folder / "checkpoint"
        return self.folder / pointer.read_text().strip() if pointer.exists() else None

    def latest_step(self):
        """The step of ``latest_checkpoint`` (from its name), or None."""
        latest = self.latest_checkpoint
        return int(latest.name[len(PREFIX):]) if latest is not None else None

    def remove_temporaries(self):
        """Deletes what a killed ``save`` left (``.ckpt-<step>.tmp`` folders, ``checkpoint.tmp``): call it only
        while no other process saves into the folder (the runner holds the run folder's lock)."""
        if not self.folder.is_dir():
            return
        for temporary in [*self.folder.glob(f".{PREFIX}*.tmp"), self.folder / "checkpoint.tmp"]:
            if temporary.is_dir() and not temporary.is_symlink():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)

    def save(self, model, optimizer, step, stream_position, run_id=None):
        """Writes ``ckpt-<step>`` atomically, points ``checkpoint`` at it and deletes all but the last ``max_to_keep``."""
        gathered = [{key: host_array(v) for key, v in variables.items()}
                    for variables in (model_variables(model), optimizer_variables(optimizer))]
        if process()[0] != 0:
            return self.folder / f"{PREFIX}{step}"
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{step}"
        temporary = self.folder / f".{name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        try:
            digests = {}
            for part, arrays in zip(PARTS, gathered):
                np.savez(temporary / f"{part}.npz", **arrays)
                digests[part] = sha256_of(temporary / f"{part}.npz")
            state = {"step": step, "stream_position": stream_position, "run_id": run_id, "sha256": digests}
            (temporary / "state.json").write_text(json.dumps(state))
        except BaseException:  # a full disk, an interruption: no half-written checkpoint stays
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        shutil.rmtree(self.folder / name, ignore_errors=True)
        os.replace(temporary, self.folder / name)
        with atomic_file(self.folder / "checkpoint", temporary=self.folder / "checkpoint.tmp") as pointer:
            pointer.write_text(name)
        for old in self.checkpoints[: -self.max_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return self.folder / name

    def restore(self, model, optimizer, run_id=None):
        """Loads the newest readable checkpoint into ``model`` and a built ``optimizer``; its state, or None.

        A corrupted newest checkpoint is skipped with a warning naming it and
        the one before is used. A checkpoint of another ``run_id``, or whose
        variable names or shapes differ from the model's, is refused
        (``IncompatibleCheckpointError`` naming them): nothing is loaded then.
        """
        candidates = self.checkpoints
        latest = self.latest_checkpoint
        if latest in candidates:  # the pointer wins over a newer folder left by a crash between rename and pointer
            candidates = candidates[: candidates.index(latest) + 1]
        for path in reversed(candidates):
            try:
                state = read_state(path)
                stored = {part: read(path, part) for part in PARTS}
            except (OSError, ValueError, KeyError, EOFError) as error:
                log.warning("Checkpoint %s is unreadable (%s); falling back to the one before.", path, error)
                continue
            if state.get("run_id") != run_id:
                raise IncompatibleCheckpointError(
                    f"{path} was written by another configuration (run {state.get('run_id')}, this one is {run_id}): "
                    "use a new output folder, or delete the old checkpoints to start over.",
                    path, run_id=run_id, stored_run_id=state.get("run_id"),
                )
            targets = dict(zip(PARTS, (model_variables(model), optimizer_variables(optimizer))))
            _keep_own_seed_states_if_others(path, stored["model"], targets["model"])
            for part in PARTS:
                _check_fits(path, part, stored[part], targets[part])
            for part in PARTS:
                for name, variable in targets[part].items():
                    variable.assign(stored[part][name])
            log.info("Restored step %d from %s.", state["step"], path)
            return state
        return None


def _keep_own_seed_states_if_others(path, arrays, variables):
    """A checkpoint whose model has other random-number generators (an earlier keras_vit drew its dropout masks
    from other layers) restores everything else; the model keeps its own seed states (logged: the masks after the
    resumption are not those of an uninterrupted run)."""
    stored = {name for name in arrays if name.startswith("seed_generator_state/")}
    own = {name for name in variables if name.startswith("seed_generator_state/")}
    if stored == own:
        return
    for name in stored:
        del arrays[name]
    for name in own:
        arrays[name] = keras.ops.convert_to_numpy(variables[name])
    log.warning("%s holds %d random-number generator states, this model %d: its own are kept (the dropout masks "
                "after resuming differ from an uninterrupted run's).", path, len(stored), len(own))


def _check_fits(path, part, arrays, variables):
    missing = sorted(set(variables) - set(arrays))
    unexpected = sorted(set(arrays) - set(variables))
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} does not fit this {part}: variables missing from it: {missing or 'none'}; "
            f"stored variables this {part} does not have: {unexpected or 'none'}. It was written by another "
            "configuration (renamed or different layers): use a new output folder.",
            path, part, missing, unexpected,
        )
    wrong = [(n, arrays[n].shape, tuple(variables[n].shape)) for n in variables if arrays[n].shape != tuple(variables[n].shape)]
    if wrong:
        shapes = "; ".join(f"{n} {stored} != {shape}" for n, stored, shape in wrong)
        raise IncompatibleCheckpointError(f"Checkpoint {path} does not fit this {part}: other shapes: {shapes}.",
                                          path, part, mis_shaped=wrong)
