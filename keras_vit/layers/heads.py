"""Poolings and the classification head: what turns the token sequence into a vector and logits.

``POOLINGS`` is the registry: a pooling is one layer (B, T, D) -> (B, D) and one line here,
``kind: PoolingKind(build, official_scope)`` with ``build(architecture, name=..., dtype=...)`` and the scope its
weights have in checkpoints (None without weights), from which files are recognised and adapted. ``token`` reads
the class token; ``gap`` and ``max`` reduce the grid tokens (prefix tokens left out); ``map`` is big_vision's
multi-head attention pooling. Every kind is a ``classifier`` (only ``token`` has a class token) and a ``pooling``.
``head`` wires the whole top: pooling, the optional representation layer (``pre_logits``, Dense + tanh) and the
classifier (``head``).

Shapes: B = batch, T = tokens, D = hidden size, N = heads, M = MLP size, K = classes.
"""

import collections

import keras
from keras import ops

from keras_vit import arguments
from keras_vit.layers.attention import MultiHeadSelfAttention
from keras_vit.layers.common import (
    LAYER_NORM_EPSILON,
    PACKAGE,
    LayerNorm,
    dense,
    mlp,
    official_weights,
    scoped,
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenPooling(keras.layers.Layer):
    """Pools a token sequence: (B, T, D) -> (B, D).

    ``"token"`` takes the class token (position 0); ``"gap"`` averages and ``"max"`` takes the channel-wise
    maximum of the tokens after the first ``num_prefix_tokens`` (the class and register tokens).
    """

    METHODS = ("token", "gap", "max")

    def __init__(self, method="token", num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        arguments.choice(lambda: self.METHODS)("method", method)
        if method == "token" and num_prefix_tokens < 1:
            raise arguments.ArgumentError("num_prefix_tokens", num_prefix_tokens, "at least 1 (a class token)",
                                          "Token pooling needs a class token; this model has none (use 'gap').")
        self.method = method
        self.num_prefix_tokens = num_prefix_tokens

    def call(self, tokens):
        if self.method == "token":
            return tokens[:, 0]
        if self.method == "max":
            return ops.max(tokens[:, self.num_prefix_tokens :], axis=1)
        return ops.mean(tokens[:, self.num_prefix_tokens :], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, num_prefix_tokens=self.num_prefix_tokens)
        return config


OFFICIAL_SCOPE = "MAPHead_0"


@keras.saving.register_keras_serializable(package=PACKAGE)
class MAPHead(keras.layers.Layer):
    """Multi-head attention pooling (big_vision's ``MAPHead``): (B, T, D) -> (B, D).

    A learned ``probe`` (1, 1, D) attends to the grid tokens (after ``num_prefix_tokens``) with
    ``MultiHeadDotProductAttention_0`` (N heads) -> a (B, 1, D); the result is ``a + MLP(LN(a))``
    (``LayerNorm_0``, ``MlpBlock_0`` with M hidden units and GELU), read at the probe: no residual from the probe
    itself. ``attention_weights(tokens)`` gives the probe's attention (B, N, 1, T - prefix).
    """

    def __init__(self, num_heads, mlp_dim, num_prefix_tokens=0, gelu="tanh", layer_norm_epsilon=LAYER_NORM_EPSILON,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.gelu = gelu
        self.layer_norm_epsilon = layer_norm_epsilon
        policy = self.dtype_policy
        self.attention = MultiHeadSelfAttention(num_heads, dtype=policy, name="MultiHeadDotProductAttention_0")
        self.norm = LayerNorm(epsilon=layer_norm_epsilon, dtype=policy, name="LayerNorm_0")
        self.mlp_in = dense(mlp_dim, "Dense_0", policy)
        self.mlp_out = None

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.probe = self.add_weight(name="probe", shape=(1, 1, hidden), initializer="glorot_uniform")
        self.mlp_out = dense(hidden, "Dense_1", self.dtype_policy)
        self.attention.build((input_shape[0], 1, hidden), input_shape)
        self.norm.build((input_shape[0], 1, hidden))
        self.mlp_in.build((input_shape[0], 1, hidden))
        self.mlp_out.build((input_shape[0], 1, self.mlp_dim))

    def official_weights(self):
        return scoped(OFFICIAL_SCOPE, {
            "probe": self.probe,
            **scoped("MultiHeadDotProductAttention_0", self.attention.official_weights()),
            **scoped("LayerNorm_0", official_weights(self.norm)),
            **scoped("MlpBlock_0/Dense_0", official_weights(self.mlp_in)),
            **scoped("MlpBlock_0/Dense_1", official_weights(self.mlp_out)),
        })

    def _probe(self, tokens):
        return ops.broadcast_to(ops.cast(self.probe, tokens.dtype), (ops.shape(tokens)[0], 1, tokens.shape[-1]))

    def call(self, tokens):
        attended = self.attention(self._probe(tokens), tokens[:, self.num_prefix_tokens :])
        pooled = attended + mlp(self.norm(attended), self.mlp_in, self.mlp_out, self.gelu)
        return pooled[:, 0]

    def attention_weights(self, tokens):
        """The probe's attention weights over the grid tokens, (B, N, 1, T - prefix), float32."""
        return self.attention(self._probe(tokens), tokens[:, self.num_prefix_tokens :], return_attention_scores=True)[1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, mlp_dim=self.mlp_dim, num_prefix_tokens=self.num_prefix_tokens,
                      gelu=self.gelu, layer_norm_epsilon=self.layer_norm_epsilon)
        return config


def _token_pooling(method):
    return lambda arch, **kwargs: TokenPooling(method, arch.num_prefix_tokens, **kwargs)


PoolingKind = collections.namedtuple("PoolingKind", "build official_scope")
POOLINGS = {
    "token": PoolingKind(_token_pooling("token"), None),
    "gap": PoolingKind(_token_pooling("gap"), None),
    "max": PoolingKind(_token_pooling("max"), None),
    "map": PoolingKind(lambda arch, **kw: MAPHead(arch.num_heads, arch.mlp_dim, arch.num_prefix_tokens, arch.gelu,
                                                  arch.layer_norm_epsilon, **kw),
                       OFFICIAL_SCOPE),
}


def head(tokens, arch, classifier_activation=None, dtype=None, output_dtype=None):
    """The top of a model on ``tokens`` (B, T, D) after ``encoder_norm``, as ``arch`` describes it.

    ``arch.pooling`` None: the tokens themselves. Otherwise the pooling layer ``pool`` -> (B, D), then with
    ``arch.fc_norm`` a LayerNorm ``fc_norm`` (timm's norm after pooling, in place of the final norm); with
    ``arch.representation_size`` R, ``pre_logits`` (Dense(R) + tanh) -> (B, R); with ``arch.classes`` K, the
    classifier ``head`` (Dense(K), zero-initialised as the official code, ``classifier_activation``, computing in
    ``output_dtype``) -> (B, K).
    """
    if arch.pooling is None:
        return tokens
    x = POOLINGS[arch.pooling].build(arch, dtype=dtype, name="pool")(tokens)
    if arch.fc_norm:
        x = LayerNorm(epsilon=arch.layer_norm_epsilon, dtype=dtype, name="fc_norm")(x)
    if arch.representation_size:
        x = keras.layers.Dense(arch.representation_size, activation="tanh", dtype=dtype, name="pre_logits")(x)
    if arch.classes:
        x = keras.layers.Dense(arch.classes, kernel_initializer="zeros", activation=classifier_activation,
                               dtype=output_dtype, name="head")(x)
    return x
