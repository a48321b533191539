"""The official learning-rate schedule and the optimizers of the recipes, for every training loop and backend.

``WarmupDecay`` is vit_jax's schedule written with ``keras.ops``; ``make_optimizer`` builds SGD with momentum
(the official fine-tuning) or Adam / AdamW (the pre-training), with optional Polyak averaging, global-norm
clipping (done by Keras' optimizer for ``model.fit``; ``Trainer`` clips the summed gradient itself) and loss
scaling for float16.
"""

import math

import keras
from keras import ops

from keras_vit.layers import PACKAGE

DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adam")


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


def make_optimizer(name, learning_rate, momentum=0.9, beta_1=0.9, beta_2=0.999, weight_decay=0.0, ema_decay=None,
                   loss_scale=False, global_clipnorm=None):
    """``"sgd"`` (momentum, the official fine-tuning) or ``"adam"`` (decoupled weight decay, the pre-training).

    ``global_clipnorm`` clips the global norm of each update's gradient (Keras' option, for ``model.fit``);
    ``Trainer`` clips the gradient summed over replicas itself, so it leaves this None.
    ``ema_decay`` keeps a Polyak average of the weights (Keras ``use_ema``);
    ``loss_scale=True`` wraps the optimizer for float16 training.
    """
    ema = dict(use_ema=ema_decay is not None, ema_momentum=ema_decay or 0.99, global_clipnorm=global_clipnorm)
    if name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=weight_decay or None, **ema)
    elif name == "adam":
        optimizer = keras.optimizers.AdamW(
            learning_rate, beta_1=beta_1, beta_2=beta_2, weight_decay=weight_decay, **ema
        ) if weight_decay else keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, **ema)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scale else optimizer
