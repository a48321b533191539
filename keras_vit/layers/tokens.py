"""Prefix tokens, the learned tokens put in front of the grid tokens: the class token and register tokens.

``PREFIX_TOKENS`` is the registry: a kind of prefix token is one layer (it inserts ``count`` learned tokens
after the ``offset`` prefix tokens already there) and one line, ``kind: PrefixKind(build, official_name,
argument, count)``: the layer's name, which is its array's name in checkpoints; the builder argument that counts
them (None when none does: the class token's presence is the classifier's); ``count(architecture)``, how many a
model has. The ``Architecture`` derives its ``prefix_tokens`` (the kinds a model has, in order) from here. Heads
and analysis read the grid tokens after ``num_prefix_tokens``.

Shapes: B = batch, T = tokens, D = hidden size.
"""

import collections

import keras
from keras import ops

from keras_vit import arguments
from keras_vit.layers.common import PACKAGE


def _tile(token, tokens):
    """``token`` (1, K, D) repeated over the batch of ``tokens`` (B, T, D), in their dtype: (B, K, D)."""
    return ops.broadcast_to(ops.cast(token, tokens.dtype), (ops.shape(tokens)[0], token.shape[1], token.shape[2]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepends one learnable token (zeros init): (B, T, D) -> (B, 1 + T, D)."""

    def build(self, input_shape):
        self.cls = self.add_weight(name="cls", shape=(1, 1, input_shape[-1]), initializer="zeros")

    def official_weights(self):
        return {"": self.cls}

    def call(self, tokens):
        return ops.concatenate([_tile(self.cls, tokens), tokens], axis=1)

    def compute_output_shape(self, input_shape):
        batch, tokens, hidden = input_shape
        return (batch, None if tokens is None else tokens + 1, hidden)

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package=PACKAGE)
class RegisterTokens(keras.layers.Layer):
    """Inserts ``count`` learnable register tokens after the first ``offset`` tokens: (B, T, D) -> (B, T + count, D).

    Registers ("Vision Transformers Need Registers", Darcet et al., 2024; timm's ``reg_tokens``) are prefix tokens
    without a position embedding that no head reads; initialised normal(std 1e-6) as timm does.
    """

    def __init__(self, count, offset=0, **kwargs):
        super().__init__(**kwargs)
        arguments.positive("count", count)
        self.count = count
        self.offset = offset

    def build(self, input_shape):
        self.registers = self.add_weight(
            name="registers", shape=(1, self.count, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=1e-6),
        )

    def official_weights(self):
        return {"": self.registers}

    def call(self, tokens):
        return ops.concatenate([tokens[:, : self.offset], _tile(self.registers, tokens), tokens[:, self.offset :]], axis=1)

    def compute_output_shape(self, input_shape):
        batch, tokens, hidden = input_shape
        return (batch, None if tokens is None else tokens + self.count, hidden)

    def get_config(self):
        config = super().get_config()
        config.update(count=self.count, offset=self.offset)
        return config


def _class_token(count, offset, **kwargs):
    return ClassToken(**kwargs)


PrefixKind = collections.namedtuple("PrefixKind", "build official_name argument count")
PREFIX_TOKENS = {  # in their order in the sequence
    "class": PrefixKind(_class_token, "cls", None, lambda arch: int(arch.classifier == "token")),
    "register": PrefixKind(RegisterTokens, "reg", "num_register_tokens", lambda arch: arch.num_register_tokens),
}


def prefix_token_layers(prefix_tokens, dtype):
    """The layers that insert ``prefix_tokens`` (``((kind, count), ...)``, in order): ``[(kind, layer), ...]``."""
    layers, offset = [], 0
    for kind, count in prefix_tokens:
        entry = PREFIX_TOKENS[kind]
        layers.append((kind, entry.build(count, offset, dtype=dtype, name=entry.official_name)))
        offset += count
    return layers
