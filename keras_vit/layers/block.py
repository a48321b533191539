"""The pre-LN Transformer encoder block.

Shapes: B = batch, T = tokens, D = hidden size, N = heads, M = MLP size.
"""

import keras
from keras import ops

from keras_vit import _speed, arguments
from keras_vit.layers.attention import MultiHeadSelfAttention
from keras_vit.layers.common import (
    GELU_FORMS,
    LAYER_NORM_EPSILON,
    PACKAGE,
    LayerNorm,
    LayerScale,
    dense,
    mlp,
    official_weights,
    scoped,
)

# One seed per training call; every random mask of the block is drawn from it with its own salt.
_PATH_ATTENTION, _PATH_MLP, _DROP_ATTENTION_OUT, _DROP_MLP_HIDDEN, _DROP_MLP_OUT = range(5)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Pre-LN Transformer encoder block: (B, T, D) -> (B, T, D).

    ``x = x + DropPath(Dropout(MSA(LN_0(x))))``, then ``x = x + DropPath(Dropout(MLP(LN_2(x))))`` with
    MLP = Dense_0 -> GELU -> Dropout -> Dense_1. Sub-layer names follow the official checkpoint
    (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3/Dense_0``,
    ``MlpBlock_3/Dense_1``). ``layer_scale`` (an initial value, timm's ``init_values``) multiplies each branch
    by a learned per-channel scale before the residual sum (``LayerScale_0``, ``LayerScale_1``: CaiT's LayerScale,
    DINOv2's); ``qkv_bias`` and ``qk_norm`` go to the attention (``MultiHeadSelfAttention``); every norm uses
    ``layer_norm_epsilon``. With ``return_attention_scores=True`` the call also returns the attention weights
    (B, N, T, T) in float32 (float64 for a float64 block).

    ``stochastic_depth_rate`` is the probability that a training sample skips each residual branch (kept
    branches are scaled by 1 / keep probability). Every random mask of a training call is drawn from one seed
    taken from the block's ``SeedGenerator`` at the start of the call.

    ``remat=True`` (gradient checkpointing) keeps only the block input for the backward pass and recomputes the
    block there (``keras_vit._speed.remat``): less memory, about one more forward pass of compute. The
    recomputation gets the call's seed, so it draws the same dropout and drop-path masks.
    """

    def __init__(self, num_heads, mlp_dim, dropout_rate=0.0, attention_dropout_rate=0.0, stochastic_depth_rate=0.0,
                 gelu="tanh", layer_norm_epsilon=LAYER_NORM_EPSILON, seed=None, remat=False, layer_scale=None,
                 qkv_bias=True, qk_norm=False, **kwargs):
        super().__init__(**kwargs)
        arguments.choice(lambda: GELU_FORMS)("gelu", gelu)
        for name, rate in (("dropout_rate", dropout_rate), ("attention_dropout_rate", attention_dropout_rate),
                           ("stochastic_depth_rate", stochastic_depth_rate)):
            arguments.rate(name, rate)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.stochastic_depth_rate = stochastic_depth_rate
        self.gelu = gelu
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed
        self.remat = remat
        self.layer_scale = layer_scale
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        policy = self.dtype_policy
        self.norm_attention = LayerNorm(epsilon=layer_norm_epsilon, dtype=policy, name="LayerNorm_0")
        self.attention = MultiHeadSelfAttention(
            num_heads, dropout_rate=attention_dropout_rate, qkv_bias=qkv_bias, qk_norm=qk_norm,
            layer_norm_epsilon=layer_norm_epsilon, dtype=policy, name="MultiHeadDotProductAttention_1"
        )
        self.scale_attention = self.scale_mlp = None
        if layer_scale is not None:
            self.scale_attention = LayerScale(layer_scale, dtype=policy, name="LayerScale_0")
            self.scale_mlp = LayerScale(layer_scale, dtype=policy, name="LayerScale_1")
        self.norm_mlp = LayerNorm(epsilon=layer_norm_epsilon, dtype=policy, name="LayerNorm_2")
        self.mlp_in = dense(mlp_dim, "Dense_0", policy)
        self.mlp_out = None  # built once the hidden size is known
        random = dropout_rate or attention_dropout_rate or stochastic_depth_rate
        self.seed_generator = keras.random.SeedGenerator(seed) if random else None

    def build(self, input_shape):
        self.mlp_out = dense(input_shape[-1], "Dense_1", self.dtype_policy)
        self.norm_attention.build(input_shape)
        self.attention.build(input_shape)
        self.norm_mlp.build(input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_dim))
        if self.layer_scale is not None:
            self.scale_attention.build(input_shape)
            self.scale_mlp.build(input_shape)

    def official_weights(self):
        return {
            **scoped("LayerNorm_0", official_weights(self.norm_attention)),
            **scoped("MultiHeadDotProductAttention_1", self.attention.official_weights()),
            **scoped("LayerNorm_2", official_weights(self.norm_mlp)),
            **scoped("MlpBlock_3/Dense_0", official_weights(self.mlp_in)),
            **scoped("MlpBlock_3/Dense_1", official_weights(self.mlp_out)),
            **({} if self.layer_scale is None else {
                **scoped("LayerScale_0", official_weights(self.scale_attention)),
                **scoped("LayerScale_1", official_weights(self.scale_mlp)),
            }),
        }

    def _scaled(self, scale, y):
        return y if scale is None else scale(y)

    def _dropout(self, y, rate, seed, salt):
        return y if seed is None or not rate else y * _speed.keep_mask(ops.shape(y), rate, seed, salt, y.dtype)

    def _drop_path(self, branch, seed, salt):
        if seed is None or not self.stochastic_depth_rate:
            return branch
        shape = (ops.shape(branch)[0], 1, 1)
        return branch * _speed.keep_mask(shape, self.stochastic_depth_rate, seed, salt, branch.dtype)

    def _forward(self, x, seed, return_attention_scores=False):
        """The block on (B, T, D); ``seed`` (2,) draws the training masks, None in inference."""
        y = self.attention(self.norm_attention(x), training=seed is not None,
                           return_attention_scores=return_attention_scores, dropout_seed=seed)
        y, weights = y if return_attention_scores else (y, None)
        y = self._scaled(self.scale_attention, self._dropout(y, self.dropout_rate, seed, _DROP_ATTENTION_OUT))
        x = x + self._drop_path(y, seed, _PATH_ATTENTION)
        y = mlp(self.norm_mlp(x), self.mlp_in, self.mlp_out, self.gelu,
                dropout=lambda h: self._dropout(h, self.dropout_rate, seed, _DROP_MLP_HIDDEN))
        y = self._scaled(self.scale_mlp, self._dropout(y, self.dropout_rate, seed, _DROP_MLP_OUT))
        x = x + self._drop_path(y, seed, _PATH_MLP)
        return (x, weights) if return_attention_scores else x

    def call(self, x, training=None, return_attention_scores=False):
        seed = self.seed_generator.next() if training and self.seed_generator is not None else None
        if self.remat and training and not return_attention_scores:
            if seed is None:
                return _speed.remat(lambda x: self._forward(x, None))(x)
            return _speed.remat(self._forward)(x, seed)
        return self._forward(x, seed, return_attention_scores)

    def attention_weights(self, x):
        """The attention weights (B, N, T, T) of the block on its input x (B, T, D), in inference."""
        return self.attention(self.norm_attention(x), return_attention_scores=True)[1]

    def compute_output_spec(self, x, training=None, return_attention_scores=False):
        return self.attention.compute_output_spec(x, return_attention_scores=return_attention_scores)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            stochastic_depth_rate=self.stochastic_depth_rate,
            gelu=self.gelu,
            layer_norm_epsilon=self.layer_norm_epsilon,
            seed=self.seed,
            remat=self.remat,
            layer_scale=self.layer_scale,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
        )
        return config
