"""Training with Keras' own loop (``loop="fit"``): ``model.compile`` + ``model.fit``, on every Keras backend.

``FitLoop`` has the interface of ``keras_vit.train.trainer.Trainer`` (``model``,
``fit``, ``evaluate``), so the runner and the tuner use either. Each
``model.fit`` epoch is one evaluation interval, as in ``Trainer.fit``; the
checkpoints are the same name-keyed ones (``keras_vit.train.checkpointing``),
written by a callback at the end of an interval (the first at or after each
multiple of ``checkpoint_every``, and at the last step), and a re-run resumes
from the newest: weights, optimizer state and the position in the data stream,
so ``fit`` ends where an uninterrupted run ends. The last interval may be
shorter (training stops at ``steps``); ``steps_per_execution`` is cut to a
divisor of the interval and of ``steps`` so that no chunk runs past either
(and to 1 on PyTorch, where Keras runs one step per call).

Differences from ``Trainer``: one device (no ``tf.distribute`` strategy with
several replicas, no gradient accumulation); gradients are clipped by the
optimizer (``global_clipnorm``); the batch logs are Keras' running means over
the interval and have no ``grad_norm``. A model that computes its own loss
(``compute_loss``, e.g. ``keras_vit.ssl.MaskedPatchPrediction``) is compiled
without ``loss``.
"""

import contextlib
import math
import time

import keras

from keras_vit.train.callbacks import check_finite_loss
from keras_vit.train.checkpointing import CheckpointManager
from keras_vit.train.data import require_examples


def _per_call(steps):
    """Steps one compiled call may run: ``steps``, or 1 on PyTorch (Keras' torch loop runs one step per call)."""
    return 1 if keras.backend.backend() == "torch" else steps


def _step(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class _StepLogs(keras.callbacks.Callback):
    """First in the list: puts the optimizer ``step`` into the batch logs and ``step``, ``learning_rate`` and
    ``images_per_second`` into the epoch logs, as ``Trainer`` reports them."""

    def __init__(self, global_batch_size):
        super().__init__()
        self.global_batch_size = global_batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._first = _step(self.model)
        self._began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["step"] = self._first + batch + 1

    def on_epoch_end(self, epoch, logs=None):
        step = _step(self.model)
        logs.update(
            step=step,
            learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            images_per_second=(step - self._first) * self.global_batch_size / (time.perf_counter() - self._began),
        )


class _Guard(keras.callbacks.Callback):
    """Last in the list: a non-finite loss raises (unless a callback stopped on it); training stops at ``steps``."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def set_model(self, model):
        super().set_model(model)
        self.trained = model  # stop_training is a plain attribute: no state sync (JAX) needed to set it

    def on_train_batch_end(self, batch, logs=None):
        step = logs["step"]
        check_finite_loss(float(logs["loss"]), step, self.trained)
        if step >= self.steps:
            self.trained.stop_training = True


class _Checkpoints(keras.callbacks.Callback):
    """Saves a checkpoint at the end of an interval that reached a multiple of ``every`` steps, or ``steps``."""

    def __init__(self, manager, every, steps, run_id):
        super().__init__()
        self.manager, self.every, self.steps, self.run_id = manager, every, steps, run_id

    def on_epoch_begin(self, epoch, logs=None):
        self._first = _step(self.model)

    def on_epoch_end(self, epoch, logs=None):
        step = _step(self.model)
        crossed = self.every and step // self.every > self._first // self.every
        if step >= self.steps or crossed:
            model = self.model  # on JAX, reading the model brings its state up to date
            self.manager.save(model, model.optimizer, step, step, self.run_id)


class FitLoop:
    """Trains ``model`` with ``model.compile`` + ``model.fit``; see the module docstring.

    Args:
        model: a classifier (logits), or a model with its own ``compute_loss`` (then ``loss=None``).
        optimizer: a Keras optimizer (``keras_vit.train.optimization.make_optimizer``; clipping through its
            ``global_clipnorm``).
        global_batch_size: images per batch of the training data.
        loss: a Keras loss, e.g. ``keras.losses.CategoricalCrossentropy(from_logits=True)``; None when
            the model computes its own. ``metrics``: Keras metrics (one named ``accuracy`` gives
            ``val_accuracy`` and ``evaluate``'s result), weighted by the data's sample weights where it has them.
        steps_per_execution: steps per compiled call (cut to a divisor of the interval, see the module).
        jit_compile: ``model.compile``'s (``"auto"``: Keras' choice for the backend).
        scope: a context the model was built in and is compiled in (a ``tf.distribute`` strategy's scope
            with one replica), or None.
    """

    def __init__(self, model, optimizer, global_batch_size, loss=None, metrics=None, steps_per_execution=1,
                 jit_compile="auto", scope=None):
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = global_batch_size
        self.steps_per_execution = steps_per_execution
        self._scope = scope or contextlib.nullcontext
        # weighted: an evaluation batch filled up for a device mesh weighs its filling 0 (data.pipeline's whole_batches)
        self._compile = dict(optimizer=optimizer, loss=loss, weighted_metrics=metrics, jit_compile=jit_compile)
        with self._scope():
            model.compile(steps_per_execution=_per_call(steps_per_execution), **self._compile)
            optimizer.build(model.trainable_variables)  # restored into before the first step

    @property
    def uses_ema(self):
        """Whether the optimizer keeps Polyak averages (``use_ema``) of the weights."""
        return getattr(self.optimizer, "inner_optimizer", self.optimizer).use_ema

    def _compiled_for(self, interval, steps):
        """Compiles again when ``steps_per_execution`` must shrink to divide the interval and ``steps``."""
        chunk = _per_call(math.gcd(self.steps_per_execution, interval, steps))
        if chunk != self.model.steps_per_execution:
            with self._scope():
                self.model.compile(steps_per_execution=chunk, **self._compile)

    def _with_ema_swap(self, callbacks):
        if self.uses_ema and not any(isinstance(c, keras.callbacks.SwapEMAWeights) for c in callbacks):
            callbacks.append(keras.callbacks.SwapEMAWeights())
        return callbacks

    def evaluate(self, dataset, use_ema=True, callbacks=None):
        """Mean per-example accuracy on a finite dataset (the ``accuracy`` metric); on the averages with EMA."""
        require_examples(dataset)
        callbacks = list(callbacks or [])
        if use_ema:
            callbacks = self._with_ema_swap(callbacks)
        logs = self.model.evaluate(dataset, callbacks=callbacks, verbose=0, return_dict=True)
        return float(logs["accuracy"])

    def fit(self, dataset, steps, eval_dataset=None, eval_every=None, callbacks=None, checkpoint_dir=None,
            checkpoint_every=None, keep_checkpoints=2, run_id=None):
        """Trains to step ``steps``, resuming from ``checkpoint_dir``; returns the ``keras.callbacks.History``.

        The arguments are ``Trainer.fit``'s: ``dataset`` a repeated dataset of batches or a callable
        ``skip_batches -> dataset``; one epoch is ``eval_every`` steps (default all), each ending with an
        evaluation on ``eval_dataset`` (``val_accuracy``; an empty one is refused before the first step);
        ``callbacks`` get Keras' protocol with ``step`` in the batch and epoch logs. At the end the model
        holds the EMA averages (with EMA), as after ``model.fit``.
        """
        if eval_dataset is not None:
            require_examples(eval_dataset, "eval_dataset")
        manager = CheckpointManager(checkpoint_dir, keep_checkpoints) if checkpoint_dir else None
        state = None
        if manager:
            with self._scope():
                state = manager.restore(self.model, self.optimizer, run_id)
        step = state["step"] if state else 0
        if callable(dataset):
            dataset = dataset(state["stream_position"] if state else 0)
        interval = eval_every or steps
        epochs = math.ceil(steps / interval)
        self._compiled_for(interval, steps)
        callbacks = [_StepLogs(self.global_batch_size), *(callbacks or [])]
        if manager:
            callbacks.append(_Checkpoints(manager, checkpoint_every, steps, run_id))
        callbacks = self._with_ema_swap(callbacks) + [_Guard(steps)]
        with self._scope():
            return self.model.fit(
                dataset,
                epochs=epochs,
                initial_epoch=epochs if step >= steps else step // interval,
                steps_per_epoch=interval,
                validation_data=eval_dataset,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles (keyed by the stream position)
                verbose=0,
            )
