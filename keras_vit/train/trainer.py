"""Training: the official learning-rate schedule, optimizers, and a ``tf.distribute`` training loop.

``Trainer`` runs the same code on the default strategy, ``MirroredStrategy``,
``MultiWorkerMirroredStrategy`` and ``TPUStrategy``. It does not use
``model.fit``, which in Keras 3.15 fails under ``MultiWorkerMirroredStrategy``
(keras issue 20585), cannot run ``steps_per_execution > 1`` under
``MirroredStrategy`` (keras issue 19246) and clips gradients per replica
before they are summed. Here each step sums the gradients over replicas
first, then clips the global norm of the full-batch gradient (as the official
code), then updates; ``steps_per_execution`` steps run in one ``tf.function``;
XLA compiles the gradient computation where it works and pays (not under
``MirroredStrategy`` on CPUs, and not for bfloat16 on CPUs, where XLA computes
bfloat16 products in float32 and oneDNN's bfloat16 kernels are faster:
benchmarks/RESULTS.md). Gradient accumulation splits each replica's
batch into micro-batches whose gradients are summed before the update, so
the update equals the full-batch one.

Checkpoints (every N steps and at the end) hold the model, optimizer and step;
re-running the same command resumes from the latest. Every worker keeps its
own checkpoint folder, so multi-worker runs need no shared file system.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_vit.train.distribute import is_chief
from keras_vit.layers import PACKAGE

DECAYS = ("cosine", "linear", "constant")


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The official ViT learning-rate schedule (vit_jax ``create_learning_rate_schedule``).

    At official step ``s`` (counted from 1): ``progress = clip((s - warmup) /
    (total - warmup), 0, 1)``; cosine: ``base * 0.5 * (1 + cos(pi * progress))``;
    linear: ``end + (base - end) * (1 - progress)``; constant: ``base``; then
    the warmup multiplies: ``lr * min(1, s / warmup)``. Keras calls a schedule
    with the optimizer's 0-based iteration count, so ``__call__(i)`` returns
    the rate of official step ``i + 1``.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, decay="cosine", linear_end=1e-5):
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}.")
        if total_steps <= warmup_steps and decay != "constant":
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}).")
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.linear_end = linear_end

    def __call__(self, iteration):
        step = ops.cast(iteration, "float32") + 1.0
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "cosine":
            lr = self.base_lr * 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.decay == "linear":
            lr = self.linear_end + (self.base_lr - self.linear_end) * (1.0 - progress)
        else:
            lr = self.base_lr * ops.ones_like(progress)
        if self.warmup_steps:
            lr = lr * ops.minimum(1.0, step / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            linear_end=self.linear_end,
        )


def make_optimizer(name, learning_rate, momentum=0.9, beta_1=0.9, beta_2=0.999, weight_decay=0.0, ema_decay=None, loss_scale=False):
    """``"sgd"`` (momentum, the official fine-tuning) or ``"adam"`` (decoupled weight decay, the pre-training).

    Gradient clipping is done by ``Trainer`` on the summed gradient, not here.
    ``ema_decay`` keeps a Polyak average of the weights (Keras ``use_ema``);
    ``loss_scale=True`` wraps the optimizer for float16 training.
    """
    ema = dict(use_ema=ema_decay is not None, ema_momentum=ema_decay or 0.99)
    if name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=weight_decay or None, **ema)
    elif name == "adam":
        optimizer = keras.optimizers.AdamW(
            learning_rate, beta_1=beta_1, beta_2=beta_2, weight_decay=weight_decay, **ema
        ) if weight_decay else keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, **ema)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}.")
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer


def _base_optimizer(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


class Checkpoints:
    """``folder/step_<N>/`` with ``model.npz``, ``optimizer.npz`` and ``state.json``; ``folder/latest`` names the newest.

    ``model.npz`` holds every model variable, the random-generator states of
    dropout included (``.weights.h5`` files leave those out), so a resumed
    run draws the same dropout masks as an uninterrupted one.

    A checkpoint is written to a temporary folder and renamed into place, and
    ``latest`` is replaced atomically, so a crash never leaves a half-written
    checkpoint behind. Older checkpoints than the last ``keep`` are deleted.
    """

    def __init__(self, folder, keep=2):
        self.folder = Path(folder)
        self.keep = keep

    def latest(self):
        pointer = self.folder / "latest"
        if not pointer.exists():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self, model, optimizer, state):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{state['step']}"
        temporary = self.folder / f".{name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        for part, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            values = {f"v{i:05d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(variables)}
            np.savez(temporary / f"{part}.npz", **values)
        (temporary / "state.json").write_text(json.dumps(state))
        shutil.rmtree(self.folder / name, ignore_errors=True)
        os.replace(temporary, self.folder / name)
        (self.folder / "latest.tmp").write_text(name)
        os.replace(self.folder / "latest.tmp", self.folder / "latest")
        steps = sorted(int(p.name[5:]) for p in self.folder.glob("step_*") if p.name[5:].isdigit())
        for old in steps[: -self.keep]:
            shutil.rmtree(self.folder / f"step_{old}", ignore_errors=True)

    def restore(self, model, optimizer, run_id=None):
        """Loads the latest checkpoint into ``model`` and a built ``optimizer``; returns its state or None."""
        path = self.latest()
        if path is None:
            return None
        stored = json.loads((path / "state.json").read_text()).get("run_id")
        if stored != run_id:
            raise ValueError(
                f"{path} was written by another configuration (run {stored}, this one is {run_id}): "
                "use a new output folder, or delete the old checkpoints to start over."
            )
        for part, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            arrays = self.read(path, part)
            shapes = [tuple(a.shape) for a in arrays]
            if shapes != [tuple(v.shape) for v in variables]:
                raise ValueError(
                    f"Checkpoint {path} does not fit this {part} ({len(arrays)} stored variables, {len(variables)} "
                    "expected, or other shapes): it was written by another configuration. Use a new output folder."
                )
            for variable, array in zip(variables, arrays):
                variable.assign(array)
        return json.loads((path / "state.json").read_text())

    @staticmethod
    def read(path, part="model"):
        """The arrays of ``model.npz`` or ``optimizer.npz`` in a checkpoint folder, in variable order."""
        with np.load(Path(path) / f"{part}.npz", allow_pickle=False) as values:
            return [values[k] for k in sorted(values.files)]


def default_jit_compile(strategy, model):
    """Whether XLA speeds up ``model``'s training here: yes except multi-worker, mirrored on CPUs, bfloat16 on CPUs."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    on_cpu = not tf.config.list_logical_devices("GPU")
    return not (on_cpu and (isinstance(strategy, tf.distribute.MirroredStrategy) or model.compute_dtype == "bfloat16"))


class Trainer:
    """Trains a model on any ``tf.distribute`` strategy: by default a classifier with soft-label cross-entropy.

    Build ``model`` and ``optimizer`` under ``strategy.scope()``. Batches are
    ``(images, one-hot labels)`` of ``global_batch_size``. ``loss_fn(images,
    labels, training) -> (per-example loss (B,), per-example accuracy (B,))``
    replaces the classification objective (e.g. ``MaskedPatchPrediction.loss_and_accuracy``,
    which ignores the labels). See the module docstring for what each step does.
    """

    def __init__(
        self,
        model,
        optimizer,
        strategy,
        global_batch_size,
        grad_clip=None,
        accumulation_steps=1,
        label_smoothing=0.0,
        steps_per_execution=1,
        jit_compile="auto",
        loss_fn=None,
    ):
        replicas = strategy.num_replicas_in_sync
        if global_batch_size % (replicas * accumulation_steps):
            raise ValueError(
                f"The global batch {global_batch_size} must divide into {replicas} replica(s) x "
                f"{accumulation_steps} accumulation step(s)."
            )
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.grad_clip = grad_clip
        self.accumulation_steps = accumulation_steps
        self.label_smoothing = label_smoothing
        self.steps_per_execution = steps_per_execution
        self.loss_fn = loss_fn or self._classification
        if jit_compile == "auto":
            jit_compile = default_jit_compile(strategy, model)
        self.jit_compile = jit_compile
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        self._gradients = tf.function(self._gradients_fn, jit_compile=jit_compile)
        self._train_chunk = tf.function(self._train_chunk_fn)
        self._eval_step = tf.function(self._eval_step_fn)

    # --- one replica -------------------------------------------------------------------------------------------

    def _classification(self, images, labels, training=True):
        logits = ops.cast(self.model(images, training=training), "float32")
        per_example = keras.losses.categorical_crossentropy(
            labels, logits, from_logits=True, label_smoothing=self.label_smoothing
        )
        hits = ops.cast(ops.argmax(logits, -1) == ops.argmax(labels, -1), "float32")
        return per_example, hits

    def _gradients_fn(self, images, labels):
        """Summed (not averaged) over this replica's micro-batches; the loss is scaled by the global batch."""
        variables = self.model.trainable_variables
        grads = [tf.zeros_like(v) for v in variables]
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for part_images, part_labels in zip(
            tf.split(images, self.accumulation_steps), tf.split(labels, self.accumulation_steps)
        ):
            with tf.GradientTape() as tape:
                per_example, hits = self.loss_fn(part_images, part_labels, training=True)
                loss = tf.reduce_sum(per_example) / self.global_batch_size
                if self.model.losses:
                    loss += tf.add_n(self.model.losses) / (self.strategy.num_replicas_in_sync * self.accumulation_steps)
                scaled = self.optimizer.scale_loss(loss)
            grads = [g + d for g, d in zip(grads, tape.gradient(scaled, variables))]
            loss_sum += tf.reduce_sum(per_example)
            correct += tf.reduce_sum(hits)
        return grads, loss_sum, correct

    def _replica_step(self, images, labels):
        grads, loss_sum, correct = self._gradients(images, labels)
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        scale = getattr(self.optimizer, "dynamic_scale", None)
        unscaled = [g / scale for g in grads] if scale is not None else grads
        norm = tf.linalg.global_norm(unscaled)
        if self.grad_clip:
            factor = tf.minimum(1.0, self.grad_clip / tf.maximum(norm, 1e-12))
            grads = [g * factor for g in grads]
        # The optimizer sums over replicas again: hand it 1/replicas of the (identical) summed gradient.
        replicas = self.strategy.num_replicas_in_sync
        grads = [g / replicas for g in grads] if replicas > 1 else grads
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss_sum, correct, norm

    # --- steps -----------------------------------------------------------------------------------------------

    def _train_chunk_fn(self, iterator, steps):
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        norm = tf.constant(0.0)
        for _ in tf.range(steps):
            images, labels = next(iterator)
            step_loss, step_correct, norm = self.strategy.run(self._replica_step, args=(images, labels))
            loss_sum += self.strategy.reduce(tf.distribute.ReduceOp.SUM, step_loss, axis=None)
            correct += self.strategy.reduce(tf.distribute.ReduceOp.SUM, step_correct, axis=None)
            norm = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, norm, axis=None)
        return loss_sum, correct, norm

    def train_steps(self, iterator, steps=1):
        """Runs ``steps`` updates in one call on batches from ``iterator``.

        ``iterator`` is ``iter(strategy.experimental_distribute_dataset(dataset))``
        of (images, one-hot labels) global batches. Returns (summed loss,
        correct predictions, gradient norm of the last step) as scalar tensors.
        """
        return self._train_chunk(iterator, tf.constant(steps))

    def _eval_step_fn(self, images, labels):
        def replica(images, labels):
            _, hits = self.loss_fn(images, labels, training=False)
            return tf.reduce_sum(hits), tf.cast(tf.shape(labels)[0], tf.float32)

        hits, count = self.strategy.run(replica, args=(images, labels))
        reduce = lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
        return reduce(hits), reduce(count)

    def evaluate(self, dataset, use_ema=True):
        """Mean per-example accuracy (top-1 for classifiers) on a finite dataset; on the averaged weights with EMA."""
        with self.averaged_weights(use_ema):
            hits = count = 0.0
            for images, labels in self.strategy.experimental_distribute_dataset(dataset):
                batch_hits, batch_count = self._eval_step(images, labels)
                hits += float(batch_hits)
                count += float(batch_count)
        return hits / max(count, 1.0)

    @contextlib.contextmanager
    def averaged_weights(self, enabled=True):
        """Inside the context the model holds the EMA (Polyak-averaged) weights; no-op without EMA."""
        pairs = self._ema_pairs() if enabled else []

        def swap():
            for variable, average in pairs:
                stored = keras.ops.convert_to_numpy(variable)
                variable.assign(average)
                average.assign(stored)

        swap()
        try:
            yield
        finally:
            swap()

    def _ema_pairs(self):
        base = _base_optimizer(self.optimizer)
        if not base.use_ema:
            return []
        averages = base._model_variables_moving_average  # Keras keeps the Polyak averages here
        return list(zip(self.model.trainable_variables, averages))

    def fit(self, dataset, steps, eval_dataset=None, output_dir=None, eval_every=None, checkpoint_every=None, log_every=50, verbose=1, callbacks=(), run_id=None):
        """Trains to ``steps`` (resuming from ``output_dir``'s checkpoint) and returns a history dict.

        ``callbacks``: Keras callbacks; their ``on_train_batch_end(step - 1, logs)`` runs after each
        ``steps_per_execution`` chunk (e.g. ``keras_vit.evaluation.FewShotCallback``). ``run_id`` (e.g. a
        hash of the configuration) is stored with each checkpoint; resuming from a checkpoint of another
        run_id is refused, so a folder never silently continues a different configuration.

        ``dataset`` is a repeated dataset, or a callable ``skip_batches -> dataset``
        so a resumed run continues the same stream. Writes TensorBoard logs,
        ``history.csv`` and checkpoints under ``output_dir`` (chief only, except
        each worker's own checkpoint folder).
        """
        chief = is_chief(self.strategy)
        checkpoints = None
        start = 0
        if output_dir:
            folder = Path(output_dir) / "checkpoints"
            if not chief:
                folder = Path(output_dir) / "workers" / f"worker_{self.strategy.cluster_resolver.task_id}" / "checkpoints"
            checkpoints = Checkpoints(folder)
            with self.strategy.scope():
                state = checkpoints.restore(self.model, self.optimizer, run_id)
            if state:
                start = state["step"]
                print(f"Resuming from step {start} ({checkpoints.latest()}).", flush=True)
        if callable(dataset):
            dataset = dataset(start)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        writer = tf.summary.create_file_writer(str(Path(output_dir) / "logs")) if output_dir and chief else None
        history_path = Path(output_dir) / "history.csv" if output_dir and chief else None
        if history_path:
            kept = history_path.read_text().splitlines()[1:] if history_path.exists() else []
            kept = [row for row in kept if int(row.split(",")[0]) <= start]  # rows after the checkpoint are redone
            header = "step,loss,train_accuracy,learning_rate,grad_norm,eval_accuracy,images_per_second"
            history_path.write_text("\n".join([header, *kept]) + "\n")
        # A progress bar on a terminal; one line per logged step otherwise (files, CI).
        progress = keras.utils.Progbar(steps) if verbose and chief and sys.stdout.isatty() else None
        echo = verbose and chief and progress is None
        history = []
        step = start
        images_seen, time_spent = 0, 0.0
        while step < steps:
            boundaries = [every - step % every for every in (log_every, eval_every, checkpoint_every) if every]
            chunk = min(self.steps_per_execution, steps - step, *boundaries)  # stop on every log/eval/checkpoint step
            began = time.perf_counter()
            loss_sum, correct, norm = self.train_steps(iterator, chunk)
            loss_sum = float(loss_sum)
            time_spent += time.perf_counter() - began
            images_seen += chunk * self.global_batch_size
            step += chunk
            record = dict(
                step=step,
                loss=loss_sum / (chunk * self.global_batch_size),
                train_accuracy=float(correct) / (chunk * self.global_batch_size),
                learning_rate=float(_learning_rate(self.optimizer, step - 1)),
                grad_norm=float(norm),
                eval_accuracy=None,
                images_per_second=images_seen / time_spent,
            )
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"The training loss became {record['loss']} at step {step}; lower the learning rate.")
            if eval_dataset is not None and eval_every and (step % eval_every == 0 or step == steps):
                record["eval_accuracy"] = self.evaluate(eval_dataset)
            for callback in callbacks:
                callback.set_model(self.model)
                callback.on_train_batch_end(step - 1, record)
            if step % log_every == 0 or step == steps or record["eval_accuracy"] is not None:
                history.append(record)
                self._log(record, writer, history_path)
                if echo:
                    print(", ".join(f"{k} {v:.4g}" for k, v in record.items() if v is not None), flush=True)
            if checkpoints and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
                checkpoints.save(self.model, self.optimizer, {"step": step, "run_id": run_id})
            if progress:
                values = [("loss", record["loss"]), ("acc", record["train_accuracy"])]
                if record["eval_accuracy"] is not None:
                    values.append(("eval_acc", record["eval_accuracy"]))
                progress.update(step, values)
        return history

    @staticmethod
    def _log(record, writer, history_path):
        if writer:
            with writer.as_default(step=record["step"]):
                for key, value in record.items():
                    if key != "step" and value is not None:
                        tf.summary.scalar(key, value)
            writer.flush()
        if history_path:
            fields = ("step", "loss", "train_accuracy", "learning_rate", "grad_norm", "eval_accuracy", "images_per_second")
            with history_path.open("a") as file:
                file.write(",".join("" if record[k] is None else f"{record[k]:.6g}" for k in fields) + "\n")


def _learning_rate(optimizer, iteration):
    rate = _base_optimizer(optimizer)._learning_rate
    return rate(iteration) if callable(rate) else keras.ops.convert_to_numpy(rate)
