"""Training with a ``tf.distribute`` loop of our own (``loop="trainer"``, TensorFlow only).

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
benchmarks/RESULTS.md). The update (gradient norm, clipping, the optimizer's
step) is an XLA computation of its own on one replica, whatever the gradients
run on: it is elementwise float32 work, about a dozen small ops per variable
in graph mode, that XLA fuses into a few loops (``default_compile_update``).
Gradient accumulation splits each replica's
batch into micro-batches whose gradients are summed before the update, so
the update equals the full-batch one.

``Trainer.fit`` drives stock ``keras.callbacks`` through the whole protocol
(one epoch is one evaluation interval), keeps name-keyed checkpoints
(``keras_vit.train.checkpointing``; re-running resumes from the latest, every
worker in its own folder, so multi-worker runs need no shared file system)
and evaluates on the EMA weights with the stock ``SwapEMAWeights``.
"""

import math
import time
from pathlib import Path

import keras
import tensorflow as tf
from keras import ops

from keras_vit.train.callbacks import check_finite_loss
from keras_vit.train.checkpointing import CheckpointManager
from keras_vit.train.data import require_examples
from keras_vit.train.distribute import is_chief


def default_jit_compile(strategy, model, precision=None):
    """Whether XLA speeds up ``model``'s training here: yes except multi-worker, mirrored on CPUs, bfloat16 on CPUs.

    ``precision``: the policy the model's layers compute in, when the model's own does not say it (a model
    built with ``dtype=...`` under Keras' global float32 policy reports float32 itself).
    """
    compute_dtype = keras.dtype_policies.get(precision).compute_dtype if precision else model.compute_dtype
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    on_cpu = not tf.config.list_logical_devices("GPU")
    return not (on_cpu and (isinstance(strategy, tf.distribute.MirroredStrategy) or compute_dtype == "bfloat16"))


def default_compile_update(strategy):
    """Whether the update runs as its own XLA computation: on one replica (not on TPUs, where all of it is XLA).

    With several replicas Keras' optimizer steps through the strategy's cross-replica update (``merge_call``),
    which cannot run inside an XLA computation.
    """
    several = (tf.distribute.TPUStrategy, tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    return strategy.num_replicas_in_sync == 1 and not isinstance(strategy, several)


class Trainer:
    """Trains a model on any ``tf.distribute`` strategy: by default a classifier with soft-label cross-entropy.

    Build ``model`` and ``optimizer`` under ``strategy.scope()``. Batches are
    ``(images, labels)`` of ``global_batch_size``: one-hot (or soft, e.g. mixed-up)
    labels (B, K), or integer class ids (B,) or (B, 1). ``loss_fn(images,
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
        compile_update="auto",
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
        if compile_update == "auto":
            compile_update = default_compile_update(strategy)
        self.compile_update = compile_update
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        model.optimizer = optimizer  # as model.compile does: stock callbacks (SwapEMAWeights, TensorBoard) read it
        self._gradients = tf.function(self._gradients_fn, jit_compile=jit_compile)
        self._update = tf.function(self._update_fn, jit_compile=True) if compile_update else self._update_fn
        self._train_chunk = tf.function(self._train_chunk_fn)
        self._eval_step = tf.function(self._eval_step_fn)

    # --- one replica -------------------------------------------------------------------------------------------

    def _classification(self, images, labels, training=True):
        logits = ops.cast(self.model(images, training=training), "float32")
        if labels.dtype.is_integer:  # class ids (B,) or (B, 1)
            labels = tf.one_hot(tf.reshape(labels, [-1]), tf.shape(logits)[-1])
        per_example = keras.losses.categorical_crossentropy(
            labels, logits, from_logits=True, label_smoothing=self.label_smoothing
        )
        hits = ops.cast(ops.argmax(logits, -1) == ops.argmax(labels, -1), "float32")
        return per_example, hits

    def _gradients_fn(self, images, labels):
        """Summed (not averaged) over this replica's micro-batches; the loss is scaled by the global batch."""
        variables = self.model.trainable_variables
        grads = None
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
            part = tape.gradient(scaled, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grads = part if grads is None else [g + d for g, d in zip(grads, part)]
            loss_sum += tf.reduce_sum(per_example)
            correct += tf.reduce_sum(hits)
        return grads, loss_sum, correct

    def _replica_step(self, images, labels):
        grads, loss_sum, correct = self._gradients(images, labels)
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        return loss_sum, correct, self._update(grads)

    def _update_fn(self, grads):
        """Clips the replicas' summed gradients, updates the weights; returns the gradient's global norm."""
        scale = getattr(self.optimizer, "dynamic_scale", None)
        unscaled = [g / scale for g in grads] if scale is not None else grads
        norm = tf.linalg.global_norm(unscaled)
        if self.grad_clip:
            factor = tf.minimum(1.0, self.grad_clip / tf.maximum(norm, 1e-12))
            grads = [g * factor for g in grads]
        # The optimizer sums over replicas again: hand it 1/replicas of the (identical) summed gradient.
        replicas = self.strategy.num_replicas_in_sync
        grads = [g / replicas for g in grads] if replicas > 1 else grads
        # The update waits for every gradient: otherwise the graph executor starts the parts that do not read
        # them (decoupled weight decay: new (P,) tensors, then in-place writes to weights that the gradient
        # computation is still reading, which copies them) while the gradients' activations are alive.
        with tf.control_dependencies([norm]):
            self.optimizer.apply(grads, self.model.trainable_variables)
        return norm

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

    # --- the loop --------------------------------------------------------------------------------------------

    @property
    def uses_ema(self):
        """Whether the optimizer keeps Polyak averages (``use_ema``) of the weights."""
        return getattr(self.optimizer, "inner_optimizer", self.optimizer).use_ema

    def evaluate(self, dataset, use_ema=True, callbacks=None):
        """Mean per-example accuracy (top-1 for classifiers) on a finite dataset; on the averaged weights with EMA.

        ``callbacks`` get ``on_test_begin``, ``on_test_batch_begin/end`` and ``on_test_end``
        (logs: ``{"accuracy": ...}``). With EMA and ``use_ema`` a stock
        ``keras.callbacks.SwapEMAWeights`` swaps the averages in on the device for the evaluation.
        """
        callbacks = list(callbacks or [])
        if use_ema and self.uses_ema and not any(isinstance(c, keras.callbacks.SwapEMAWeights) for c in callbacks):
            callbacks.append(keras.callbacks.SwapEMAWeights())
        return self._evaluate(dataset, keras.callbacks.CallbackList(callbacks, model=self.model))

    def _evaluate(self, dataset, callbacks):
        callbacks.on_test_begin()
        hits = count = 0.0
        for batch, (images, labels) in enumerate(self.strategy.experimental_distribute_dataset(dataset)):
            callbacks.on_test_batch_begin(batch)
            batch_hits, batch_count = self._eval_step(images, labels)
            hits += float(batch_hits)
            count += float(batch_count)
            callbacks.on_test_batch_end(batch, {"accuracy": hits / count})
        if not count:
            raise ValueError("The evaluation dataset holds no examples: its accuracy would be 0/0. Give one with examples.")
        logs = {"accuracy": hits / count}
        callbacks.on_test_end(logs)
        return logs["accuracy"]

    def fit(self, dataset, steps, eval_dataset=None, eval_every=None, callbacks=None, checkpoint_dir=None,
            checkpoint_every=None, keep_checkpoints=2, run_id=None):
        """Trains to step ``steps``, resuming from ``checkpoint_dir``, and returns the ``keras.callbacks.History``.

        Args:
            dataset: a repeated dataset of (images, one-hot labels) global batches, or a callable
                ``skip_batches -> dataset`` so that a resumed run continues the same stream.
            steps: the step to train to (counted from the first run, not from the resumed step).
            eval_dataset: a finite dataset evaluated at the end of every epoch (``val_accuracy``); an empty one
                is refused (``ValueError``) before the first step.
            eval_every: steps per epoch: one epoch is one evaluation interval; default: all ``steps``.
            callbacks: ``keras.callbacks.Callback`` instances, driven as ``model.fit`` drives them:
                train, epoch, batch and test begin/end with logs. ``batch`` is the global step index of
                the last step of each ``steps_per_execution`` chunk (the step is ``batch + 1``). Batch
                logs: ``loss``, ``accuracy``, ``grad_norm``, ``step``; epoch logs add ``learning_rate`` (of the next
                step, as Keras reports it), ``images_per_second``, ``step`` and ``val_accuracy``.
                ``model.stop_training = True`` ends training after the current chunk. With EMA a
                ``SwapEMAWeights`` is added (unless given) so evaluations use the averaged weights.
            checkpoint_dir: where ``checkpointing.CheckpointManager`` keeps the last ``keep_checkpoints``
                checkpoints, every ``checkpoint_every`` steps and at ``steps``; each worker but the chief
                writes under ``checkpoint_dir/workers/worker_<i>`` (no shared file system needed).
            run_id: stored with each checkpoint; resuming a checkpoint of another run id is refused.

        A non-finite loss raises ``FloatingPointError`` naming the step, unless a callback (e.g.
        ``TerminateOnNaN``) stopped training on it. At the end, as ``model.fit`` does, the optimizer's
        ``finalize_variable_values`` writes the EMA averages into the model (no-op without EMA).
        """
        if eval_dataset is not None:
            require_examples(eval_dataset, "eval_dataset")
        manager = self._checkpoint_manager(checkpoint_dir, keep_checkpoints)
        state = None
        if manager:
            with self.strategy.scope():
                state = manager.restore(self.model, self.optimizer, run_id)
        step = state["step"] if state else 0
        if callable(dataset):
            dataset = dataset(state["stream_position"] if state else 0)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        epoch_steps = eval_every or steps
        callbacks = self._callback_list(callbacks, epochs=math.ceil(steps / epoch_steps), steps=epoch_steps)
        self.model.stop_training = False
        callbacks.on_train_begin()
        logs = {}
        while step < steps and not self.model.stop_training:
            epoch = step // epoch_steps
            callbacks.on_epoch_begin(epoch)
            logs = self._train_epoch(iterator, step, min(steps, (epoch + 1) * epoch_steps), callbacks, manager, checkpoint_every, run_id)
            step = logs["step"]
            if eval_dataset is not None:
                logs["val_accuracy"] = self._evaluate(eval_dataset, callbacks)
            callbacks.on_epoch_end(epoch, logs)
            if manager and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                manager.save(self.model, self.optimizer, step, step, run_id)
        callbacks.on_train_end(logs)
        with self.strategy.scope():
            self.optimizer.finalize_variable_values(self.model.trainable_variables)
        return self.model.history

    def _train_epoch(self, iterator, step, end, callbacks, manager, checkpoint_every, run_id):
        """Steps ``step`` to ``end`` in ``steps_per_execution`` chunks (cut at checkpoint steps); the epoch logs."""
        first, loss_sum, correct, began = step, 0.0, 0.0, time.perf_counter()
        while step < end and not self.model.stop_training:
            boundary = checkpoint_every - step % checkpoint_every if manager and checkpoint_every else end - step
            chunk = min(self.steps_per_execution, end - step, boundary)
            callbacks.on_train_batch_begin(step)
            chunk_loss, chunk_correct, norm = (float(t) for t in self.train_steps(iterator, chunk))
            step += chunk
            loss_sum, correct = loss_sum + chunk_loss, correct + chunk_correct
            examples = chunk * self.global_batch_size
            batch_logs = {"loss": chunk_loss / examples, "accuracy": chunk_correct / examples, "grad_norm": norm, "step": step}
            callbacks.on_train_batch_end(step - 1, batch_logs)
            check_finite_loss(batch_logs["loss"], step, self.model)
            if manager and checkpoint_every and step % checkpoint_every == 0 and step < end:
                manager.save(self.model, self.optimizer, step, step, run_id)
        examples = max(step - first, 1) * self.global_batch_size
        return {
            "loss": loss_sum / examples,
            "accuracy": correct / examples,
            "grad_norm": batch_logs["grad_norm"] if step > first else float("nan"),
            "learning_rate": float(keras.ops.convert_to_numpy(self.optimizer.learning_rate)),
            "images_per_second": (step - first) * self.global_batch_size / (time.perf_counter() - began),
            "step": step,
        }

    def _callback_list(self, callbacks, epochs, steps):
        callbacks = list(callbacks or [])
        if self.uses_ema and not any(isinstance(c, keras.callbacks.SwapEMAWeights) for c in callbacks):
            callbacks.append(keras.callbacks.SwapEMAWeights())
        return keras.callbacks.CallbackList(callbacks, add_history=True, model=self.model, epochs=epochs, steps=steps, verbose=0)

    def _checkpoint_manager(self, checkpoint_dir, keep):
        if not checkpoint_dir:
            return None
        folder = Path(checkpoint_dir)
        if not is_chief(self.strategy):
            folder = folder / "workers" / f"worker_{self.strategy.cluster_resolver.task_id}"
        return CheckpointManager(folder, keep)
