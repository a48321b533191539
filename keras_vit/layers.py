"""Keras layers of the Vision Transformer (Dosovitskiy et al., 2020).

Every layer is written with ``keras.ops`` only, so it runs unchanged on the
TensorFlow, JAX and PyTorch Keras backends, and every layer is registered for
``.keras`` serialization (no ``Lambda`` layers: files load with ``safe_mode``).

Shapes use B = batch, H x W = image, C = channels, D = hidden size,
T = tokens, N = heads, dh = D / N (head size), M = MLP size.
"""

import math

import keras
from keras import ops

PACKAGE = "keras_vit"

# LayerNorm epsilon of the official code (flax's default is 1e-6).
LAYER_NORM_EPSILON = 1e-6
GELU_FORMS = ("tanh", "erf")


def to_pair(value, what="size"):
    """Returns ``(h, w)`` from an int or a pair of ints."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"Expected an int or a pair (height, width) for the {what}, got {value!r}.")
    return pair


# Memory-lean gradients. Each function below computes its forward pass with exactly the ops of the plain
# computation (same numbers) and defines its gradient with ``keras.ops.custom_gradient`` so that the backward
# pass keeps only the function's inputs and recomputes the rest: plain autodiff of a tanh-GELU keeps four
# (B*T, M) tensors per block, of a LayerNorm a float32 copy of its input and a (B, T, D) scale, of the
# attention its (B, N, T, T) probabilities (twice under mixed precision). Half-precision gradients are computed
# in float32 and cast back. benchmarks/RESULTS.md lists what a training step keeps, by op.


def _after(upstream, *tensors):
    """``tensors`` for a recomputation in a backward pass, read only once ``upstream`` exists (TensorFlow).

    A recomputation that reads only forward tensors would otherwise run in (or be merged into) the forward
    pass, and its result would be kept alive, which is what it is there to avoid. TensorFlow's graph executor
    runs an op as soon as its inputs exist and its optimizer merges identical ops: a control dependency on
    ``upstream`` prevents both. XLA (``jit_compile``) drops control dependencies and merges the recomputation
    with the forward ops in its common-subexpression pass (on CPU it removes optimization barriers before
    that pass), which kept every block's (B, N, T, T) probabilities: each tensor also gets ``0 * upstream[0]``
    added, the same numbers (for a finite upstream; a non-finite one makes every gradient non-finite anyway)
    but values that XLA can neither merge with the forward ones nor compute before ``upstream``.
    """
    if keras.backend.backend() != "tensorflow":
        return tensors
    import tensorflow as tf

    zero = tf.reshape(upstream, [-1])[0] * 0
    with tf.control_dependencies([upstream]):
        return tuple(tf.identity(t + tf.cast(zero, t.dtype)) for t in tensors)


def _upstream(args, upstream):
    """The output cotangent of a ``custom_gradient`` grad function (positional on TF/JAX, keyword on torch)."""
    return args[0] if upstream is None else upstream


def _compute_dtype(x):
    """float32 for half-precision tensors (gradients are computed in float32), else the tensor's dtype."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _gelu_derivative(x, form):
    """d gelu(x) / dx, elementwise, written differently from the forward ops (so that none are merged)."""
    if form == "tanh":
        square = x * x
        t = ops.tanh(x * (_SQRT_2_OVER_PI + (_SQRT_2_OVER_PI * _GELU_CUBIC) * square))
        return 0.5 * (1.0 + t) + (0.5 * _SQRT_2_OVER_PI) * x * (1.0 - t * t) * (1.0 + 3.0 * _GELU_CUBIC * square)
    return 0.5 * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0)))) + x * ops.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def gelu(x, form="tanh"):
    """GELU activation: ``"tanh"`` (the official model's approximation) or ``"erf"`` (exact); any shape.

    The exact form is written with ``keras.ops.erf`` so that it exports to ONNX
    (TensorFlow's own exact-GELU op does not). The gradient keeps only ``x``.
    """
    if form not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {form!r}.")
    x = ops.convert_to_tensor(x)

    @ops.custom_gradient
    def activation(x):
        if form == "tanh":
            y = ops.gelu(x, approximate=True)
        else:
            y = 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))

        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            (x_,) = _after(upstream, x)
            dtype = _compute_dtype(x_)
            derivative = _gelu_derivative(ops.cast(x_, dtype), form)
            return ops.cast(ops.cast(upstream, dtype) * derivative, x_.dtype)

        return y, grad

    return activation(x)


def layer_norm(x, gamma, beta, epsilon=LAYER_NORM_EPSILON):
    """LayerNorm over the last axis, as ``keras.ops.layer_normalization``: (..., D) -> (..., D), x's dtype.

    Statistics in at least float32; ``gamma`` and ``beta`` are (D,). The gradient keeps ``x`` (and ``gamma``) and
    recomputes the statistics.
    """

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        y = ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)

        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            x_, gamma_ = _after(upstream, x, gamma)
            dtype = _compute_dtype(x_)
            xf = ops.cast(x_, dtype)
            mean = ops.mean(xf, axis=-1, keepdims=True)
            centered = xf - mean
            rstd = ops.rsqrt(ops.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
            normalized = centered * rstd
            g = ops.cast(upstream, dtype)
            batch_axes = tuple(range(len(x_.shape) - 1))
            d_gamma = ops.sum(g * normalized, axis=batch_axes)
            d_beta = ops.sum(g, axis=batch_axes)
            g = g * ops.cast(gamma_, dtype)
            dx = rstd * (
                g - ops.mean(g, axis=-1, keepdims=True) - normalized * ops.mean(g * normalized, axis=-1, keepdims=True)
            )
            return ops.cast(dx, x_.dtype), ops.cast(d_gamma, gamma_.dtype), ops.cast(d_beta, beta.dtype)

        return y, grad

    # Copies read variables into tensors: TensorFlow's custom_gradient refuses variables read inside it.
    return normalize(x, ops.copy(gamma), ops.copy(beta))


def attention(q, k, v):
    """``softmax(q k^T) v`` per head: q, k, v (B, N, T, dh) -> (B, N, T, dh); q already scaled by 1/sqrt(dh).

    The softmax runs in float32 for half-precision inputs (its probabilities are cast to q's dtype for the
    product with v), in the inputs' dtype otherwise. The
    gradient keeps q, k and v and recomputes the (B, N, T, T) probabilities.
    """

    @ops.custom_gradient
    def attend(q, k, v):
        softmax_dtype = _compute_dtype(q)
        weights = ops.softmax(ops.cast(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), softmax_dtype), axis=-1)
        out = ops.matmul(ops.cast(weights, q.dtype), v)

        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            q_, k_, v_ = _after(upstream, q, k, v)
            logits = ops.einsum("bnqd,bnkd->bnqk", q_, k_)  # recomputed, not transposed: no op to merge with
            weights = ops.softmax(ops.cast(logits, softmax_dtype), axis=-1)
            d_v = ops.matmul(ops.transpose(ops.cast(weights, q_.dtype), (0, 1, 3, 2)), upstream)
            d_weights = ops.cast(ops.matmul(upstream, ops.transpose(v_, (0, 1, 3, 2))), softmax_dtype)
            d_logits = weights * (d_weights - ops.sum(d_weights * weights, axis=-1, keepdims=True))
            d_logits = ops.cast(d_logits, q_.dtype)
            d_q = ops.matmul(d_logits, k_)
            d_k = ops.matmul(ops.transpose(d_logits, (0, 1, 3, 2)), q_)
            return d_q, d_k, d_v

        return out, grad

    return attend(q, k, v)


def keep_mask(shape, rate, seed_generator, dtype):
    """A (shape) tensor of 0 and 1 / keep in ``dtype``: each entry kept with probability keep = 1 - ``rate``.

    ``rate`` in (0, 1).
    Drawn with a ``keras.random.SeedGenerator``. On TensorFlow each entry compares 16 random bits with
    round(65536 keep) (so keep is within 2^-17 of 1 - rate, and kept entries are scaled by the exact inverse:
    the mask's mean is 1), two entries per 32-bit Philox number, the algorithm named explicitly. TF's default
    algorithm ("auto_select", what ``keras.random`` uses) is lowered by XLA on CPU to a generator about 100x
    slower, which made dropout most of an XLA training step; benchmarks/dropout_masks.py measures both.
    Other backends compare ``keras.random.uniform`` noise with keep.
    """
    keep = 1.0 - rate
    if keras.backend.backend() != "tensorflow":
        noise = keras.random.uniform(shape, dtype="float32", seed=seed_generator)
        return ops.cast(noise < keep, dtype) / ops.cast(keep, dtype)
    import tensorflow as tf

    threshold = min(max(round(keep * 65536), 1), 65535)
    seed = tf.cast(tf.math.floormod(seed_generator.next(), tf.int32.max - 1), tf.int32)  # as keras.random does
    count = tf.reduce_prod(tf.cast(tf.stack(shape), tf.int32))
    bits = tf.random.stateless_uniform([(count + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    halves = tf.reshape(tf.reshape(tf.bitcast(bits, tf.uint16), [-1])[:count], shape)
    return tf.cast(halves < threshold, dtype) * tf.cast(65536 / threshold, dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose mask comes from ``keep_mask``: (...) -> (...), fast under XLA on CPU.

    Keras' semantics (an entry is zeroed with probability ``rate``, kept ones are scaled so that the mean is
    kept); the random draws differ from Keras' layer. ``noise_shape`` is Keras' (None: one draw per entry).
    """

    def call(self, inputs, training=False):
        if not training or not self.rate:
            return inputs
        shape = ops.shape(inputs)
        if self.noise_shape is not None:
            shape = tuple(shape[i] if size is None else size for i, size in enumerate(self.noise_shape))
        return inputs * keep_mask(shape, self.rate, self.seed_generator, inputs.dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Patches(keras.layers.Layer):
    """Patch embedding: (B, H, W, C) -> (B, gh * gw, D), row-major grid order.

    A convolution with kernel = stride = patch size, VALID padding and a bias,
    as the official ``embedding`` conv; its output grid (B, gh, gw, D) is then
    flattened row by row. Rectangular images and patches are allowed; an image
    side that is not a multiple of the patch side is a ``ValueError``.
    """

    def __init__(
        self,
        patch_size,
        hidden_size,
        kernel_initializer="lecun_normal",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = to_pair(patch_size, "patch size")
        self.hidden_size = hidden_size
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.projection = keras.layers.Conv2D(
            hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        for axis, side in ((1, "height"), (2, "width")):
            size, patch = input_shape[axis], self.patch_size[axis - 1]
            if size is not None and size % patch:
                raise ValueError(
                    f"Image {side} {size} is not divisible by the patch {side} {patch}: "
                    f"use an image {side} that is a multiple of {patch} "
                    f"(for example {size // patch * patch} or {(size // patch + 1) * patch})."
                )
        self.projection.build(input_shape)

    @property
    def kernel(self):
        """Patch-embedding kernel, (ph, pw, C, D) (HWIO, the official layout)."""
        return self.projection.kernel

    @property
    def bias(self):
        return self.projection.bias

    def call(self, images):
        grid = self.projection(images)
        gh, gw = grid.shape[1], grid.shape[2]
        if gh is None or gw is None:
            shape = ops.shape(grid)
            return ops.reshape(grid, (shape[0], shape[1] * shape[2], self.hidden_size))
        return ops.reshape(grid, (-1, gh * gw, self.hidden_size))

    def compute_output_shape(self, input_shape):
        batch, h, w, _ = input_shape
        tokens = None if h is None or w is None else (h // self.patch_size[0]) * (w // self.patch_size[1])
        return (batch, tokens, self.hidden_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepends one learnable token (zeros init): (B, T, D) -> (B, 1 + T, D)."""

    def build(self, input_shape):
        self.cls = self.add_weight(name="cls", shape=(1, 1, input_shape[-1]), initializer="zeros")

    def call(self, tokens):
        cls = ops.broadcast_to(ops.cast(self.cls, tokens.dtype), (ops.shape(tokens)[0], 1, ops.shape(tokens)[-1]))
        return ops.concatenate([cls, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        batch, tokens, hidden = input_shape
        return (batch, None if tokens is None else tokens + 1, hidden)


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddPositionEmbs(keras.layers.Layer):
    """Adds learnable 1-D position embeddings (1, T, D), normal(std 0.02) init: (B, T, D) -> (B, T, D)."""

    def __init__(self, initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer or keras.initializers.RandomNormal(stddev=0.02))

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError("AddPositionEmbs needs a known number of tokens: give the model a fixed image size.")
        self.pos_embedding = self.add_weight(
            name="pos_embedding", shape=(1, input_shape[1], input_shape[2]), initializer=self.initializer
        )

    def call(self, tokens):
        return tokens + ops.cast(self.pos_embedding, tokens.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(initializer=keras.initializers.serialize(self.initializer))
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the last axis whose gradient keeps only its input.

    (..., D) -> (..., D). Same weights (``gamma``, ``beta``), config and
    forward computation as the Keras layer (see ``layer_norm``); only the
    last axis, with centering and scaling.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.axis not in (-1, [-1]) or not (self.center and self.scale) or self.rms_scaling:
            raise ValueError(
                "LayerNorm normalizes the last axis with center=True, scale=True and rms_scaling=False; "
                "use keras.layers.LayerNormalization for other settings."
            )

    def call(self, inputs):
        return ops.cast(layer_norm(inputs, self.gamma, self.beta, self.epsilon), self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head dot-product self-attention with the official parameter layout.

    (B, T, D) -> (B, T, D), and optionally the attention weights (B, N, T, T).
    Parameters: ``query_kernel``/``key_kernel``/``value_kernel`` (D, N, dh) with
    biases (N, dh), ``out_kernel`` (N, dh, D) with bias (D,), exactly the shapes
    of flax's ``MultiHeadDotProductAttention``. Queries are scaled by 1/sqrt(dh);
    the softmax runs in float32 under mixed precision (in float64 for float64
    models). Without attention
    weights to return or attention dropout to apply, the core runs through
    ``attention`` (whose gradient keeps q, k, v, not the (B, N, T, T) weights).
    """

    def __init__(
        self,
        num_heads,
        dropout_rate=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.dropout = Dropout(dropout_rate, dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise ValueError(
                f"Hidden size {hidden} is not divisible by num_heads {self.num_heads}: "
                "choose a number of heads that divides the hidden size."
            )
        head_dim = hidden // self.num_heads
        # Glorot fan-in/out over the flattened (D, N*dh) matrix, as flax's DenseGeneral.
        in_proj = _FlattenedFans(self.kernel_initializer, fan_in=hidden, fan_out=hidden)
        for name in ("query", "key", "value"):
            setattr(
                self,
                f"{name}_kernel",
                self.add_weight(name=f"{name}_kernel", shape=(hidden, self.num_heads, head_dim), initializer=in_proj),
            )
            setattr(
                self,
                f"{name}_bias",
                self.add_weight(name=f"{name}_bias", shape=(self.num_heads, head_dim), initializer=self.bias_initializer),
            )
        self.out_kernel = self.add_weight(
            name="out_kernel", shape=(self.num_heads, head_dim, hidden), initializer=in_proj
        )
        self.out_bias = self.add_weight(name="out_bias", shape=(hidden,), initializer=self.bias_initializer)

    def call(self, x, training=None, return_attention_scores=False):
        # One (B*T, D) x (D, 3D) product for q, k and v, the 1/sqrt(dh) query
        # scale folded into the query kernel; heads then move next to the batch
        # axis for two batched products. Inside a layer call Keras casts the
        # float32 variables to the compute dtype.
        batch, tokens, hidden = ops.shape(x)[0], ops.shape(x)[1], self.query_kernel.shape[0]
        heads, head_dim = self.num_heads, self.query_kernel.shape[-1]
        scale = 1.0 / math.sqrt(head_dim)
        kernel = ops.concatenate(
            [ops.reshape(self.query_kernel * scale, (hidden, hidden)),
             ops.reshape(self.key_kernel, (hidden, hidden)),
             ops.reshape(self.value_kernel, (hidden, hidden))],
            axis=1,
        )
        bias = ops.concatenate(
            [ops.reshape(self.query_bias * scale, (hidden,)),
             ops.reshape(self.key_bias, (hidden,)),
             ops.reshape(self.value_bias, (hidden,))],
            axis=0,
        )
        qkv = ops.matmul(ops.reshape(x, (-1, hidden)), kernel) + bias  # (B*T, 3D)
        qkv = ops.transpose(ops.reshape(qkv, (batch, tokens, 3, heads, head_dim)), (2, 0, 3, 1, 4))
        q, k, v = ops.unstack(qkv, 3, axis=0)  # (B, N, T, dh) each; unstacking has a cheap gradient
        if return_attention_scores or (training and self.dropout_rate):
            logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))  # (B, N, T, T)
            weights = ops.softmax(ops.cast(logits, _compute_dtype(logits)), axis=-1)
            dropped = self.dropout(ops.cast(weights, x.dtype), training=training)
            context = ops.matmul(dropped, v)
        else:  # the same ops, with a gradient that keeps q, k, v instead of the probabilities
            context = attention(q, k, v)
        context = ops.transpose(context, (0, 2, 1, 3))  # (B, T, N, dh)
        out = ops.matmul(ops.reshape(context, (-1, hidden)), ops.reshape(self.out_kernel, (hidden, hidden)))
        out = ops.reshape(out + self.out_bias, (batch, tokens, hidden))
        if return_attention_scores:
            return out, weights
        return out

    def compute_output_spec(self, x, training=None, return_attention_scores=False):
        out = keras.KerasTensor(x.shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return out
        batch, tokens = x.shape[0], x.shape[1]
        return out, keras.KerasTensor((batch, self.num_heads, tokens, tokens), dtype=_compute_dtype(out))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


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
        matrix = self.initializer((self.fan_in, self.fan_out), dtype=dtype)
        return ops.reshape(matrix, shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Pre-LN Transformer encoder block: (B, T, D) -> (B, T, D).

    ``x = x + DropPath(Dropout(MSA(LN_0(x))))``, then
    ``x = x + DropPath(MLP(LN_2(x)))`` with MLP = Dense_0 -> GELU -> Dropout ->
    Dense_1 -> Dropout. Sub-layer names follow the official checkpoint
    (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
    ``MlpBlock_3/Dense_0``, ``MlpBlock_3/Dense_1``). With
    ``return_attention_scores=True`` the call also returns the attention
    weights (B, N, T, T) in float32 (float64 for a float64 block).

    ``stochastic_depth_rate`` is the probability that a training sample skips
    each residual branch (kept branches are scaled by 1 / keep probability).

    ``remat=True`` (gradient checkpointing) keeps only the block input for the
    backward pass and recomputes the block's activations there: less memory,
    about one more forward pass of compute. The random masks of a training
    call (dropout, drop path) are drawn before the recomputed part, so the
    recomputation sees the same masks; attention dropout is not supported
    with it.
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        gelu="tanh",
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        seed=None,
        remat=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if remat and attention_dropout_rate:
            raise ValueError(
                "remat=True does not support attention dropout (its (B, N, T, T) mask would have to be kept): "
                "set attention_dropout_rate=0 or remat=False."
            )
        if gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
        if not 0.0 <= stochastic_depth_rate < 1.0:
            raise ValueError(f"stochastic_depth_rate must be in [0, 1), got {stochastic_depth_rate}.")
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.stochastic_depth_rate = stochastic_depth_rate
        self.gelu = gelu
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed
        self.remat = remat
        policy = self.dtype_policy
        self.norm_attention = LayerNorm(epsilon=layer_norm_epsilon, dtype=policy, name="LayerNorm_0")
        self.attention = MultiHeadSelfAttention(
            num_heads, dropout_rate=attention_dropout_rate, dtype=policy, name="MultiHeadDotProductAttention_1"
        )
        self.norm_mlp = LayerNorm(epsilon=layer_norm_epsilon, dtype=policy, name="LayerNorm_2")
        self.mlp_in = keras.layers.Dense(
            mlp_dim,
            kernel_initializer="glorot_uniform",
            bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
            dtype=policy,
            name="Dense_0",
        )
        self.mlp_out = None  # built once the hidden size is known
        self.dropout = Dropout(dropout_rate, dtype=policy, name="dropout")
        random = stochastic_depth_rate or (remat and dropout_rate)
        self.seed_generator = keras.random.SeedGenerator(seed) if random else None

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.mlp_out = keras.layers.Dense(
            hidden,
            kernel_initializer="glorot_uniform",
            bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
            dtype=self.dtype_policy,
            name="Dense_1",
        )
        self.norm_attention.build(input_shape)
        self.attention.build(input_shape)
        self.norm_mlp.build(input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_dim))

    def _training_masks(self, x):
        """Every random mask of one training call: drop path (B, 1, 1) x 2, dropout (B*T, D), (B*T, M), (B*T, D)."""
        batch, tokens, hidden = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        masks = {}
        if self.stochastic_depth_rate:
            for name in ("path_attention", "path_mlp"):
                masks[name] = keep_mask((batch, 1, 1), self.stochastic_depth_rate, self.seed_generator, x.dtype)
        if self.dropout_rate:
            for name, width in (("attention_out", hidden), ("mlp_hidden", self.mlp_dim), ("mlp_out", hidden)):
                masks[name] = keep_mask((batch * tokens, width), self.dropout_rate, self.seed_generator, x.dtype)
        return masks

    def _dropout(self, y, training, masks, name):
        if masks is None:
            return self.dropout(y, training=training)
        return y * masks[name] if name in masks else y

    def _drop_path(self, branch, training, masks, name):
        if not training or not self.stochastic_depth_rate:
            return branch
        if masks is None:
            shape = (ops.shape(branch)[0], 1, 1)
            return branch * keep_mask(shape, self.stochastic_depth_rate, self.seed_generator, branch.dtype)
        return branch * masks[name]

    def _forward(self, x, training, masks=None, return_attention_scores=False):
        """The block on (B, T, D); ``masks`` (from ``_training_masks``) replace the layers' own random draws."""
        shape = ops.shape(x)
        y = self.attention(self.norm_attention(x), training=training, return_attention_scores=return_attention_scores)
        y, weights = y if return_attention_scores else (y, None)
        y = ops.reshape(self._dropout(ops.reshape(y, (-1, shape[-1])), training, masks, "attention_out"), shape)
        x = x + self._drop_path(y, training, masks, "path_attention")
        # The MLP runs on (B*T, D) rows: plain matrix products that TensorFlow
        # fuses with their bias and activation.
        y = ops.reshape(self.norm_mlp(x), (-1, shape[-1]))
        y = self._dropout(gelu(self.mlp_in(y), self.gelu), training, masks, "mlp_hidden")
        y = self._dropout(self.mlp_out(y), training, masks, "mlp_out")
        x = x + self._drop_path(ops.reshape(y, shape), training, masks, "path_mlp")
        return (x, weights) if return_attention_scores else x

    def call(self, x, training=None, return_attention_scores=False):
        if self.remat and training and not return_attention_scores:
            masks = self._training_masks(x)
            names = sorted(masks)

            def block(x, *mask_values):
                return self._forward(x, training, dict(zip(names, mask_values)))

            return keras.remat(block)(x, *(masks[name] for name in names))
        return self._forward(x, training, return_attention_scores=return_attention_scores)

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
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenPooling(keras.layers.Layer):
    """Pools a token sequence: (B, T, D) -> (B, D).

    ``"token"`` takes the class token (position 0); ``"gap"`` averages and
    ``"max"`` takes the channel-wise maximum of the tokens after the first
    ``num_prefix_tokens`` (0 for official gap models, which have no class
    token; 1 excludes the class token of a token model).
    """

    METHODS = ("token", "gap", "max")

    def __init__(self, method="token", num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        if method not in self.METHODS:
            raise ValueError(f"TokenPooling method must be one of {self.METHODS}, got {method!r}.")
        if method == "token" and num_prefix_tokens < 1:
            raise ValueError("Token pooling needs a class token; this model has none (use 'gap').")
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionWeights(keras.layers.Layer):
    """The attention weights of a ``TransformerBlock`` on its input: (B, T, D) -> (B, N, T, T), float32 (float64 for a float64 block).

    Shares the block's variables (it runs the block's ``LayerNorm_0`` and
    attention sub-layers); used by ``VisionTransformer.features`` to expose
    every block's attention as a graph output next to the block's own output.
    """

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, x, training=None):
        return self.block.attention(self.block.norm_attention(x), training=training, return_attention_scores=True)[1]

    def compute_output_spec(self, x, training=None):
        dtype = _compute_dtype(keras.KerasTensor((), dtype=self.block.compute_dtype))
        return keras.KerasTensor((x.shape[0], self.block.num_heads, x.shape[1], x.shape[1]), dtype=dtype)

    def get_config(self):
        config = super().get_config()
        config.update(block=keras.saving.serialize_keras_object(self.block))
        return config

    @classmethod
    def from_config(cls, config):
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)
