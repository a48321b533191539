"""Multi-head dot-product attention with the official parameter layout, its projections as Keras layers.

Shapes: B = batch, T = query tokens, S = key/value tokens, D = hidden size, N = heads, dh = D / N.
"""

import math

import keras
from keras import ops

from keras_vit import _speed
from keras_vit.arguments import ArgumentError
from keras_vit.layers.common import LAYER_NORM_EPSILON, PACKAGE, LayerNorm, official_weights, scoped

_PROJECTIONS = ("query", "key", "value", "out")


class _FlattenedFans(keras.initializers.Initializer):
    """Runs a variance-scaling initializer on the 2-D (fan_in, fan_out) matrix and reshapes it.

    Keras computes fans of a 3-D kernel as for a convolution; flax's DenseGeneral
    uses the flattened input and output sizes, which this reproduces.
    """

    def __init__(self, initializer, fan_in, fan_out):
        self.initializer = initializer
        self.fan_in = fan_in
        self.fan_out = fan_out

    def __call__(self, shape, dtype=None):
        return ops.reshape(self.initializer((self.fan_in, self.fan_out), dtype=dtype), shape)


def _fresh(initializer, index):
    """A new instance of ``initializer`` for projection ``index``: one instance draws the same values on every call
    (an integer seed, or the default seed it picked), so q, k, v and out would start equal; flax draws each apart.
    A given integer seed is offset by ``index``; one seeded by a ``SeedGenerator`` draws anew on every call as it is."""
    if isinstance(getattr(initializer, "seed", None), keras.random.SeedGenerator):
        return initializer
    config = initializer.get_config()
    if isinstance(config.get("seed"), int):
        config["seed"] += index
    return initializer.__class__.from_config(config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Projection(keras.layers.EinsumDense):
    """An ``EinsumDense`` projection of ``MultiHeadSelfAttention`` (quantization and LoRA are Keras').

    Its only addition to ``EinsumDense``: when its attention layer has read its variables from a file written
    before the projections were layers (keras_vit <= 0.1.0 at 410d757), it has no entry of its own there to load.
    """

    _filled_by_parent = False

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses (they may change ``call``); this one computes exactly what EinsumDense does.
        super().quantize(mode, type_check=False, config=config)

    def load_own_variables(self, store):
        if self._filled_by_parent and not len(store.keys()):
            return
        super().load_own_variables(store)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head dot-product attention (flax's ``MultiHeadDotProductAttention``): (B, T, D) -> (B, T, D).

    Sub-layers ``query``, ``key``, ``value`` (``EinsumDense``, kernels (D, N, dh), biases (N, dh), none with
    ``qkv_bias=False``) and ``out`` (kernel (N, dh, D), bias (D,)): the official shapes and names, so Keras'
    ``quantize`` and ``enable_lora`` reach every projection. ``qk_norm=True`` adds a LayerNorm over each head's dh
    on queries and keys (``query_ln``, ``key_ln``, epsilon ``layer_norm_epsilon``; timm's ``q_norm``,
    ``k_norm``, Flax's ``normalize_qk``) before the scale. Queries are scaled by 1/sqrt(dh); the softmax runs in float32 under mixed
    precision (in float64 for float64 models). ``call(x)`` is self-attention; ``call(x, key_value)``
    attends from ``x`` (B, T, D) to ``key_value`` (B, S, D) (the MAP head's probe). With
    ``return_attention_scores=True`` it also returns the weights (B, N, T, S).

    ``call`` is three steps: the heads q, k, v (``_heads``), the core ``softmax(q k^T) v``
    (``keras_vit._speed.dot_product_attention``) and the output projection (``_merge_heads``). While no
    projection is quantized or LoRA-enabled, self-attention computes q, k and v in one (B*T, D) x (D, 3D)
    product with the scale folded into the query kernel, and the output projection as one (B*T, D) x (D, D)
    product (same parameters, faster on CPUs); the core takes the fastest path here. ``keras_vit.reference_ops()``
    turns both off (the formulas as written).
    """

    def __init__(self, num_heads, dropout_rate=0.0, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 seed=None, qkv_bias=True, qk_norm=False, layer_norm_epsilon=LAYER_NORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.query_ln = self.key_ln = None
        if qk_norm:
            self.query_ln = LayerNorm(epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="query_ln")
            self.key_ln = LayerNorm(epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="key_ln")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout_rate else None

    def build(self, x_shape, key_value_shape=None):
        hidden = x_shape[-1]
        if hidden % self.num_heads:
            raise ArgumentError(
                "num_heads", self.num_heads, f"a divisor of the hidden size {hidden}",
                f"Hidden size {hidden} is not divisible by num_heads {self.num_heads}: "
                "choose a number of heads that divides the hidden size."
            )
        heads, head_dim = self.num_heads, hidden // self.num_heads

        def projection(name, equation, output_shape, bias_axes):
            # Glorot fan-in/out over the flattened (D, N*dh) matrix, as flax's DenseGeneral; each projection its own draw.
            index = _PROJECTIONS.index(name)
            kernel_initializer = _FlattenedFans(_fresh(self.kernel_initializer, index), fan_in=hidden, fan_out=hidden)
            return Projection(equation, output_shape, bias_axes=bias_axes, kernel_initializer=kernel_initializer,
                              bias_initializer=_fresh(self.bias_initializer, index), dtype=self.dtype_policy, name=name)

        qkv_bias = "nh" if self.qkv_bias else None
        self.query = projection("query", "btd,dnh->btnh", (None, heads, head_dim), qkv_bias)
        self.key = projection("key", "btd,dnh->btnh", (None, heads, head_dim), qkv_bias)
        self.value = projection("value", "btd,dnh->btnh", (None, heads, head_dim), qkv_bias)
        self.out = projection("out", "btnh,nhd->btd", (None, hidden), "d")
        key_value_shape = key_value_shape or x_shape
        self.query.build(x_shape)
        self.key.build(key_value_shape)
        self.value.build(key_value_shape)
        self.out.build((*x_shape[:-1], heads, head_dim))
        if self.qk_norm:
            self.query_ln.build((None, head_dim))
            self.key_ln.build((None, head_dim))

    @property
    def head_dim(self):
        return self.query.kernel.shape[-1]

    def official_weights(self):
        weights = {}
        for name in _PROJECTIONS:
            weights.update(scoped(name, official_weights(getattr(self, name))))
        for name in ("query_ln", "key_ln") if self.qk_norm else ():
            weights.update(scoped(name, official_weights(getattr(self, name))))
        return weights

    def _normed(self, q, k, scale):
        """With ``qk_norm``: LayerNorm over each head's dh of q and k (timm's ``q_norm``, ``k_norm``), then q scaled."""
        if not self.qk_norm:
            return q, k
        return self.query_ln(q) * ops.cast(scale, q.dtype), self.key_ln(k)

    def _fused(self):
        """Whether the projections may be fused: plain (not quantized, no LoRA) and the speed path on."""
        return _speed.fused_projections() and all(
            getattr(self, name).quantization_mode is None and not getattr(self, name).lora_enabled
            for name in _PROJECTIONS
        )

    def _heads(self, x, key_value, fused):
        """q (scaled by 1/sqrt(dh)), k, v (B, N, T, dh) of x (B, T, D) and key_value (B, S, D) (None: x).

        Fused (self-attention only): one (B*T, D) x (D, 3D) product with the scale folded into the query kernel."""
        scale = 1.0 / math.sqrt(self.head_dim)
        folded = 1.0 if self.qk_norm else scale  # with qk_norm the scale comes after the norm
        if key_value is not None or not fused:
            source = x if key_value is None else key_value
            q = self.query(x) * ops.cast(folded, x.dtype) if folded != 1.0 else self.query(x)
            k, v = self.key(source), self.value(source)
            q, k = self._normed(q, k, scale)
            return [ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, v)]  # heads beside the batch
        batch, tokens, hidden = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        kernel = ops.concatenate(
            [ops.reshape(self.query.kernel * folded, (hidden, hidden)),
             ops.reshape(self.key.kernel, (hidden, hidden)),
             ops.reshape(self.value.kernel, (hidden, hidden))],
            axis=1,
        )
        bias = None
        if self.qkv_bias:
            bias = ops.concatenate(
                [ops.reshape(self.query.bias * folded, (hidden,)),
                 ops.reshape(self.key.bias, (hidden,)),
                 ops.reshape(self.value.bias, (hidden,))],
                axis=0,
            )
        qkv = _speed.dense(ops.reshape(x, (-1, hidden)), kernel, bias)  # (B*T, 3D)
        qkv = ops.reshape(qkv, (batch, tokens, 3, self.num_heads, self.head_dim))
        # one transpose for the three (a view on PyTorch); unstacking has a cheap gradient
        q, k, v = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 3, axis=0)
        q, k = self._normed(q, k, scale)
        return q, k, v

    def _merge_heads(self, context, x, fused):
        """The output projection of ``context`` (B, N, T, dh) -> (B, T, D); fused: one (B*T, D) x (D, D) product."""
        context = ops.transpose(context, (0, 2, 1, 3))  # (B, T, N, dh)
        if not fused:
            return self.out(context)
        hidden = self.out.kernel.shape[-1]
        out = _speed.dense(ops.reshape(context, (-1, hidden)), ops.reshape(self.out.kernel, (hidden, hidden)),
                           self.out.bias)
        return ops.reshape(out, (ops.shape(x)[0], ops.shape(x)[1], hidden))

    def call(self, x, key_value=None, training=None, return_attention_scores=False, dropout_seed=None):
        fused = self._fused()
        q, k, v = self._heads(x, key_value, fused)
        dropout = None
        if training and self.dropout_rate:
            seed = self.seed_generator.next() if dropout_seed is None else dropout_seed
            dropout = lambda p: p * _speed.keep_mask(ops.shape(p), self.dropout_rate, seed, 5, p.dtype)  # noqa: E731
        context, weights = _speed.dot_product_attention(q, k, v, return_attention_scores, dropout)
        out = self._merge_heads(context, x, fused)
        return (out, weights) if return_attention_scores else out

    def compute_output_spec(self, x, key_value=None, training=None, return_attention_scores=False, dropout_seed=None):
        out = keras.KerasTensor(x.shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return out
        source = x if key_value is None else key_value
        shape = (x.shape[0], self.num_heads, x.shape[1], source.shape[1])
        return out, keras.KerasTensor(shape, dtype=_speed.compute_dtype(out))

    def load_own_variables(self, store):
        """Reads files written before the projections were layers, whose attention held its 8 variables itself."""
        if len(store.keys()) != 2 * len(_PROJECTIONS):
            return super().load_own_variables(store)
        for i, name in enumerate(_PROJECTIONS):
            layer = getattr(self, name)
            layer.kernel.assign(store[str(2 * i)])
            layer.bias.assign(store[str(2 * i + 1)])
            layer._filled_by_parent = True

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            seed=self.seed,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionWeights(keras.layers.Layer):
    """The attention weights a layer computes on its input, through its ``attention_weights`` method.

    A ``TransformerBlock``: (B, T, D) -> (B, N, T, T); a ``MAPHead``: (B, T, D) -> (B, N, 1, T - prefix); float32
    (float64 for a float64 layer). Shares the layer's variables; ``VisionTransformer.features`` uses it to expose
    attention as a graph output next to the layer's own output.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, x):
        return self.layer.attention_weights(x)

    def get_config(self):
        config = super().get_config()
        config.update(layer=keras.saving.serialize_keras_object(self.layer))
        return config

    @classmethod
    def from_config(cls, config):
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)
