"""The training-speed machinery of the Transformer block, kept beside it: lean gradients, fast dropout masks,
rematerialisation with replayed randomness.

Every function here computes the same numbers as the plain computation it replaces (the same forward ops); only
what the backward pass keeps, or how fast a random mask is drawn, differs:

* ``gelu``, ``layer_norm`` and ``attention`` have gradients (``keras.ops.custom_gradient``, so on TensorFlow, JAX
  and PyTorch) that keep only their inputs and recompute the rest in the backward pass. Plain autodiff of a
  tanh-GELU keeps four (B*T, M) tensors per block, of a LayerNorm a float32 copy of its input and a (B, T, D)
  scale, of the attention its (B, N, T, T) probabilities (twice under mixed precision). Half-precision gradients
  are computed in float32 and cast back. ``plain_autodiff()`` switches them off (tests compare both).
* ``keep_mask`` draws a dropout mask from a seed tensor (stateless), on TensorFlow with Philox and 16 bits per
  entry: TF's default algorithm is lowered by XLA on CPU to a generator about 100x slower.
* ``fused_attention`` says where ``keras.ops.dot_product_attention`` is the faster core (PyTorch).
* ``native_gradients`` says where the backend's own GELU and LayerNorm kernels are already lean (PyTorch: they
  keep their input and per-row statistics and run one fused backward kernel), so the custom gradients are not used.
* ``dense`` is a product plus bias, one fused kernel where keras.ops has none (PyTorch's ``addmm``).
* ``remat`` recomputes a function in the backward pass; the random masks inside it are drawn from a seed passed in
  as an argument, so the recomputation replays the same masks.

Shapes: B = batch, T = tokens, N = heads, dh = head size, M = MLP size.
"""

import contextlib
import contextvars
import math

import keras
from keras import ops

_LEAN_GRADIENTS = contextvars.ContextVar("keras_vit_lean_gradients", default=True)


@contextlib.contextmanager
def plain_autodiff():
    """Within the context, models traced or called use the plain autodiff gradients of GELU, LayerNorm and attention."""
    token = _LEAN_GRADIENTS.set(False)
    try:
        yield
    finally:
        _LEAN_GRADIENTS.reset(token)


def lean_gradients():
    """Whether the lean gradients are on (the default; off inside ``plain_autodiff()``)."""
    return _LEAN_GRADIENTS.get()


def after(upstream, *tensors):
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


def compute_dtype(x):
    """float32 for half-precision tensors (softmax and gradients run in float32), else the tensor's dtype."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


# PyTorch's CPU kernel of the tanh form is about 5x slower than its exact (erf) one in bfloat16. The two forms differ
# by at most 4.7e-4 anywhere (largest at x = 2.7, where bfloat16's own rounding step is 0.0156), so on PyTorch CPUs
# the tanh form of a bfloat16 tensor is computed by the exact kernel, at its speed (benchmarks/RESULTS.md, "CPU speed
# with AMX"). float32 and float16 keep the tanh form exactly.
def _exact_kernel_for_tanh(x):
    return (keras.backend.backend() == "torch" and keras.backend.standardize_dtype(x.dtype) == "bfloat16"
            and x.device.type == "cpu")


def _plain_gelu(x, form):
    if form == "tanh":
        return ops.gelu(x, approximate=not _exact_kernel_for_tanh(x))
    # Written with erf so that it exports to ONNX (TensorFlow's own exact-GELU op does not).
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_derivative(x, form):
    """d gelu(x) / dx, elementwise, written differently from the forward ops (so that none are merged)."""
    if form == "tanh":
        square = x * x
        t = ops.tanh(x * (_SQRT_2_OVER_PI + (_SQRT_2_OVER_PI * _GELU_CUBIC) * square))
        return 0.5 * (1.0 + t) + (0.5 * _SQRT_2_OVER_PI) * x * (1.0 - t * t) * (1.0 + 3.0 * _GELU_CUBIC * square)
    return 0.5 * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0)))) + x * ops.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


# Backends whose own GELU (``keras.ops.gelu``) and LayerNorm kernels keep only their input (and the per-row mean and
# 1/std) for the backward pass and compute that pass in one fused kernel: the custom gradients below would add work
# and save no memory there (PyTorch; benchmarks/RESULTS.md, "CPU speed with AMX").
NATIVE_GRADIENT_BACKENDS = ("torch",)


def native_gradients():
    """Whether this backend's own GELU and LayerNorm gradients are used (they are lean already)."""
    return keras.backend.backend() in NATIVE_GRADIENT_BACKENDS


def gelu(x, form="tanh"):
    """GELU, ``"tanh"`` (the official approximation) or ``"erf"`` (exact): any shape; the gradient keeps only ``x``."""
    x = ops.convert_to_tensor(x)
    if not lean_gradients() or native_gradients():
        return _plain_gelu(x, form)

    @ops.custom_gradient
    def activation(x):
        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            (x_,) = after(upstream, x)
            dtype = compute_dtype(x_)
            derivative = _gelu_derivative(ops.cast(x_, dtype), form)
            return ops.cast(ops.cast(upstream, dtype) * derivative, x_.dtype)

        return _plain_gelu(x, form), grad

    return activation(x)


def layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, as ``keras.ops.layer_normalization``: (..., D) -> (..., D), x's dtype.

    Statistics in at least float32; ``gamma`` and ``beta`` are (D,). The gradient keeps ``x`` (and ``gamma``) and
    recomputes the statistics. On ``NATIVE_GRADIENT_BACKENDS`` the backend's fused kernel normalizes a
    half-precision ``x`` as it is (PyTorch's ``layer_norm`` takes bfloat16 input with float32 ``gamma`` and
    ``beta``, computes the statistics in float32 and rounds once: the same numbers as casting ``x`` to float32
    first, without the two casts).
    """
    if native_gradients():
        import torch

        x = ops.convert_to_tensor(x)
        gamma, beta = ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta)
        if x.dtype == torch.float64 or gamma.dtype != beta.dtype:
            return ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)
        if x.dtype != gamma.dtype and gamma.dtype != torch.float32:
            gamma, beta = gamma.float(), beta.float()
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, epsilon)
    if not lean_gradients():
        return ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            x_, gamma_ = after(upstream, x, gamma)
            dtype = compute_dtype(x_)
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

        return ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon), grad

    # Copies read variables into tensors: TensorFlow's custom_gradient refuses variables read inside it.
    return normalize(x, ops.copy(gamma), ops.copy(beta))


def attention_weights(q, k):
    """``softmax(q k^T)``: q (B, N, Tq, dh), k (B, N, Tk, dh) -> (B, N, Tq, Tk) in float32 for half-precision inputs."""
    return ops.softmax(ops.cast(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), compute_dtype(q)), axis=-1)


# Backends whose softmax kernel takes half-precision logits and computes in float32 inside (TensorFlow: oneDNN's
# softmax on CPUs, tested to give the float32 softmax rounded): there the attention core's softmax runs on the
# half-precision logits as they are, without casting the (B, N, Tq, Tk) tensor to float32 and back
# (benchmarks/RESULTS.md, "Attention core per backend").
HALF_SOFTMAX_BACKENDS = ("tensorflow",)


def _probabilities(q, k):
    """``softmax(q k^T)`` in q's dtype, computed in float32 for half-precision q: (B, N, Tq, Tk)."""
    if keras.backend.backend() in HALF_SOFTMAX_BACKENDS:
        return ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), axis=-1)
    return ops.cast(attention_weights(q, k), q.dtype)


def attention(q, k, v):
    """``softmax(q k^T) v`` per head: q (B, N, Tq, dh), k and v (B, N, Tk, dh) -> (B, N, Tq, dh).

    ``q`` is already scaled by 1/sqrt(dh). The softmax runs in float32 for half-precision inputs (its
    probabilities are in q's dtype for the product with v; ``_probabilities``). The gradient keeps q, k and v and
    recomputes the (B, N, Tq, Tk) probabilities in float32.
    """
    if not lean_gradients():
        return ops.matmul(_probabilities(q, k), v)

    @ops.custom_gradient
    def attend(q, k, v):
        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            q_, k_, v_ = after(upstream, q, k, v)
            softmax_dtype = compute_dtype(q_)
            logits = ops.einsum("bnqd,bnkd->bnqk", q_, k_)  # recomputed, not transposed: no op to merge with
            weights = ops.softmax(ops.cast(logits, softmax_dtype), axis=-1)
            d_v = ops.matmul(ops.transpose(ops.cast(weights, q_.dtype), (0, 1, 3, 2)), upstream)
            d_weights = ops.cast(ops.matmul(upstream, ops.transpose(v_, (0, 1, 3, 2))), softmax_dtype)
            d_logits = weights * (d_weights - ops.sum(d_weights * weights, axis=-1, keepdims=True))
            d_logits = ops.cast(d_logits, q_.dtype)
            d_q = ops.matmul(d_logits, k_)
            d_k = ops.matmul(ops.transpose(d_logits, (0, 1, 3, 2)), q_)
            return d_q, d_k, d_v

        return ops.matmul(_probabilities(q, k), v), grad

    return attend(q, k, v)


# Backends where the backend's fused attention kernel (PyTorch's scaled_dot_product_attention, which reads q, k and v
# as strided views) is faster than ``attention`` for inference and training; on TensorFlow and JAX
# ``keras.ops.dot_product_attention`` is slower on CPUs (``benchmarks/attention_paths.py``, benchmarks/RESULTS.md).
FUSED_ATTENTION_BACKENDS = ("torch",)


def fused_attention():
    """Whether the attention core runs through the backend's fused kernel (``fused_attention_core``) here."""
    return keras.backend.backend() in FUSED_ATTENTION_BACKENDS


def fused_attention_core(q, k, v):
    """``softmax(q k^T) v`` by the backend's fused kernel: q (B, N, Tq, dh) already scaled, k and v (B, N, Tk, dh)
    -> (B, N, Tq, dh).

    On PyTorch ``scaled_dot_product_attention`` on the tensors as they are (views of one q/k/v product need no
    copy; ``keras.ops.dot_product_attention`` makes each contiguous on CPUs), elsewhere
    ``keras.ops.dot_product_attention``.
    """
    if keras.backend.backend() == "torch":
        import torch

        q, k, v = (ops.convert_to_tensor(t) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    heads_last = lambda t: ops.transpose(t, (0, 2, 1, 3))  # noqa: E731  (B, N, T, dh) <-> (B, T, N, dh)
    return heads_last(ops.dot_product_attention(heads_last(q), heads_last(k), heads_last(v), scale=1.0))


# Backends where a product plus bias has a fused kernel that ``keras.ops`` does not reach (PyTorch's ``addmm``; on
# TensorFlow the graph optimizer already fuses ``matmul`` + ``add``, on JAX XLA does).
FUSED_BIAS_BACKENDS = ("torch",)


def fused_bias():
    """Whether ``dense`` is one fused kernel on this backend (where it is worth calling instead of a Dense layer)."""
    return keras.backend.backend() in FUSED_BIAS_BACKENDS


def dense(x, kernel, bias):
    """``x @ kernel + bias``: x (N, K), kernel (K, F), bias (F,) -> (N, F), one kernel on ``FUSED_BIAS_BACKENDS``."""
    if fused_bias():
        import torch

        x, kernel, bias = (ops.convert_to_tensor(t) for t in (x, kernel, bias))
        if x.dtype == kernel.dtype == bias.dtype:
            return torch.addmm(bias, x, kernel)
    return ops.matmul(x, kernel) + bias


def keep_mask(shape, rate, seed, salt, dtype):
    """A (shape) tensor of 0 and 1 / keep in ``dtype``: each entry kept with probability keep = 1 - ``rate``.

    ``rate`` in (0, 1); ``seed`` an int tensor (2,) (e.g. ``SeedGenerator.next()``) and ``salt`` a Python int that
    tells apart the masks drawn from one seed: the same (seed, salt) gives the same mask (what ``remat`` replays).
    On TensorFlow each entry compares 16 random bits with round(65536 keep) (so keep is within 2^-17 of
    1 - rate, and kept entries are scaled by the exact inverse: the mask's mean is 1), two entries per 32-bit
    Philox number, the algorithm named explicitly. Other backends compare uniform noise with keep.
    """
    keep = 1.0 - rate
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), tf.int32.max - 1), tf.int32)
        # The salt folded in, not added to the counter: SeedGenerator.next() steps the counter by 1, so (counter
        # + salt) was the next call's seed, and a mask repeated one call later (or a prefix of another mask's bits).
        seed = tf.random.experimental.stateless_fold_in(seed, tf.constant(salt, tf.int32), alg="philox")
        threshold = min(max(round(keep * 65536), 1), 65535)
        count = tf.reduce_prod(tf.cast(tf.stack(shape), tf.int32))
        bits = tf.random.stateless_uniform([(count + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32,
                                           alg="philox")
        halves = tf.reshape(tf.reshape(tf.bitcast(bits, tf.uint16), [-1])[:count], shape)
        return tf.cast(halves < threshold, dtype) * tf.cast(65536 / threshold, dtype)
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.numpy.asarray(seed, "uint32"), salt)
        noise = jax.random.uniform(key, tuple(shape), dtype="float32")
    else:
        import torch

        seed = ops.convert_to_tensor(seed)
        first, second = (int(s) for s in ops.convert_to_numpy(seed))
        generator = torch.Generator(device=seed.device)
        generator.manual_seed((first * 1_000_003 + second * 8191 + salt) % (2**63))
        noise = torch.rand(tuple(int(s) for s in shape), generator=generator, device=seed.device)
    return ops.cast(noise < keep, dtype) / ops.cast(keep, dtype)


def remat(function):
    """``function`` recomputed in the backward pass instead of keeping its activations (``keras.remat``).

    Random masks inside ``function`` must be drawn from a seed among its arguments (``keep_mask``), so that the
    recomputation draws the same ones.
    """
    return keras.remat(function)
