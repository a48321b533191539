"""Callbacks Keras does not have: a step-based progress line; and the rule for a non-finite training loss.

Everything else a training run reports goes through stock ``keras.callbacks``
(``TensorBoard``, ``CSVLogger``, ``EarlyStopping``, ``TerminateOnNaN``,
``SwapEMAWeights``, ``History``) driven by either training loop
(``keras_vit.train.trainer.Trainer`` or ``keras_vit.train.fit_loop.FitLoop``).
"""

import logging
import math

import keras

log = logging.getLogger(__name__)


class ProgressLogger(keras.callbacks.Callback):
    """Logs one line every ``every_n_steps`` training steps and at each epoch end (INFO, this module's logger).

    ``keras.callbacks.ProgbarLogger`` redraws a bar per epoch, which says
    little when an epoch is thousands of steps and nothing in a log file; this
    writes ``step 500: loss 1.23, accuracy 0.45, ...`` lines instead. The step
    is the batch logs' ``step`` (both training loops put the optimizer step
    there), else ``batch + 1``; with ``steps_per_execution > 1`` a line is
    written at the first chunk end at or after each multiple of ``every_n_steps``.
    """

    def __init__(self, every_n_steps=50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self._last_logged = 0

    def on_train_begin(self, logs=None):
        self._last_logged = 0

    def on_train_batch_end(self, batch, logs=None):
        step = int((logs or {}).get("step", batch + 1))
        if step // self.every_n_steps > self._last_logged // self.every_n_steps:
            self._last_logged = step
            log.info("step %d: %s", step, _format(logs))

    def on_epoch_end(self, epoch, logs=None):
        log.info("epoch %d: %s", epoch + 1, _format(logs))


def _format(logs):
    return ", ".join(
        f"{key} {value:.4g}" for key, value in (logs or {}).items() if isinstance(value, (int, float)) and key != "step"
    )


def check_finite_loss(loss, step, model):
    """Raises ``FloatingPointError`` naming the step when the training ``loss`` is not finite, unless a callback
    (e.g. ``keras.callbacks.TerminateOnNaN``) already stopped training on it (``model.stop_training``)."""
    if not math.isfinite(loss) and not model.stop_training:
        raise FloatingPointError(f"The training loss became {loss} at step {step}; lower the learning rate.")
