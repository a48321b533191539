"""What every layer module shares: the package name for registration, the official constants, ``LayerNorm``,
``Dropout``, the MLP and the official names of Keras' stock layers.

Shapes: B = batch, T = tokens, D = hidden size, M = MLP size.
"""

import keras
from keras import ops

from keras_vit import _speed, arguments

PACKAGE = "keras_vit"

# LayerNorm epsilon of the official code (flax's default is 1e-6).
LAYER_NORM_EPSILON = 1e-6
GELU_FORMS = ("tanh", "erf", "quick")  # the official approximation, the exact form, CLIP's x * sigmoid(1.702 x)


def to_pair(value, what="size"):
    """Returns ``(h, w)`` from an int or a pair of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"Expected an int or a pair (height, width) of ints for the {what}, got {value!r}.")
    return pair


def gelu(x, form="tanh"):
    """GELU activation: ``"tanh"`` (the official model's approximation), ``"erf"`` (exact) or ``"quick"`` (OpenAI
    CLIP's ``x * sigmoid(1.702 x)``); any shape."""
    arguments.choice(lambda: GELU_FORMS)("gelu", form)
    return _speed.gelu(x, form)


def official_weights(layer):
    """``{official name relative to the layer: variable}`` of a layer of a keras_vit model.

    A keras_vit layer declares its own (``layer.official_weights()``); Keras' stock layers map by kind: ``Dense``
    and convolutions ``kernel`` (and ``bias``), normalizations ``scale`` and ``bias``. None for a layer without
    an official counterpart.
    """
    if hasattr(layer, "official_weights"):
        return layer.official_weights()
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.GroupNormalization)):
        return {"scale": layer.gamma, "bias": layer.beta}
    if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv2D)):
        weights = {"kernel": layer.kernel}
        if layer.bias is not None:
            weights["bias"] = layer.bias
        return weights
    return None


def scoped(scope, weights):
    """``weights`` ({name: variable}) with ``scope/`` in front of every name."""
    return {f"{scope}/{name}": variable for name, variable in weights.items()}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the last axis whose gradient keeps only its input.

    (..., D) -> (..., D). Same weights (``gamma``, ``beta``), config and forward computation as the Keras layer;
    only the last axis, with centering and scaling.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.axis not in (-1, [-1]) or not (self.center and self.scale) or self.rms_scaling:
            raise ValueError(
                "LayerNorm normalizes the last axis with center=True, scale=True and rms_scaling=False; "
                "use keras.layers.LayerNormalization for other settings."
            )

    def call(self, inputs):
        return ops.cast(_speed.layer_norm(inputs, self.gamma, self.beta, self.epsilon), self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerScale(keras.layers.Layer):
    """LayerScale (Touvron et al. 2021, CaiT; timm's ``ls1``/``ls2``): (..., D) -> (..., D) times a learned
    per-channel ``scale`` (D,), initialised to ``init_value``."""

    def __init__(self, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],),
                                     initializer=keras.initializers.Constant(self.init_value))

    def official_weights(self):
        return {"scale": self.scale}

    def call(self, x):
        return x * ops.cast(self.scale, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose mask comes from ``keras_vit._speed.keep_mask``: (...) -> (...), fast under XLA.

    Keras' semantics (an entry is zeroed with probability ``rate``, kept ones are scaled so that the mean is
    kept); the random draws differ from Keras' layer. ``noise_shape`` is Keras' (None: one draw per entry).
    """

    def call(self, inputs, training=False):
        if not training or not self.rate:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = tuple(shape[i] if size is None else size for i, size in enumerate(self.noise_shape))
        return inputs * _speed.keep_mask(shape, self.rate, self.seed_generator.next(), 0, inputs.dtype)


def project(layer, rows):
    """``layer(rows)`` for a ``Dense`` layer on (N, K) rows; a plain one (no quantization, no LoRA) as one fused
    product + bias where the backend has that kernel and keras.ops does not reach it (``_speed.dense``)."""
    if _speed.fused_bias() and layer.quantization_mode is None and not layer.lora_enabled and layer.bias is not None:
        return _speed.dense(rows, layer.kernel, layer.bias)
    return layer(rows)


def mlp(x, dense_in, dense_out, form, dropout=None):
    """The official MlpBlock on any (..., D): ``dense_out(dropout(gelu(dense_in(x))))`` with the hidden (..., M).

    The products run on 2-D rows (B*T, D), which TensorFlow fuses with their bias and activation.
    ``dropout`` (a function of the hidden tensor) applies the training-time dropout, if any.
    """
    shape = ops.shape(x)
    y = gelu(project(dense_in, ops.reshape(x, (-1, x.shape[-1]))), form)
    if dropout is not None:
        y = dropout(y)
    y = project(dense_out, y)
    return ops.reshape(y, (*shape[:-1], y.shape[-1]))


def dense(units, name, dtype, kernel_initializer="glorot_uniform"):
    """A ``Dense`` initialised as flax's: the given kernel initializer, biases normal(std 1e-6)."""
    return keras.layers.Dense(
        units,
        kernel_initializer=kernel_initializer,
        bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
        dtype=dtype,
        name=name,
    )
