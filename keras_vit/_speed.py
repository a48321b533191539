"""The speed machinery of the model's layers, kept beside them: lean gradients, fused kernels, fast dropout masks,
rematerialisation with replayed randomness, and the switch that turns every speed path off (``reference_ops``).

Every speed path computes what the plain formula computes (the same forward ops, or the same numbers within
rounding); only what the backward pass keeps, which kernel runs, or how fast a random mask is drawn, differs.
``SPEED_PATHS`` names them:

* ``lean_gradients``: ``gelu``, ``layer_norm`` and ``attention`` have gradients (``keras.ops.custom_gradient``, so
  on TensorFlow, JAX and PyTorch) that keep only their inputs and recompute the rest in the backward pass. Plain
  autodiff of a tanh-GELU keeps four (B*T, M) tensors per block, of a LayerNorm a float32 copy of its input and a
  (B, T, D) scale, of the attention its (B, N, T, T) probabilities (twice under mixed precision). Half-precision
  gradients are computed in float32 and cast back.
* ``native_layer_norm``: PyTorch's own LayerNorm kernel on half-precision input (``layer_norm``).
* ``fused_projections``: the attention's q, k and v as one product and its output projection as one product.
* ``fused_attention``: the backend's fused attention kernel where it is faster (PyTorch's SDPA).
* ``fused_bias``: a product plus bias as one kernel where keras.ops has none (PyTorch's ``addmm``).
* ``half_softmax``: the attention softmax on half-precision logits where the backend's kernel measurably computes
  in float32 inside (``half_softmax``).
* ``gelu_swap``: the tanh GELU of bfloat16 computed by PyTorch's exact kernel on CPUs (within bfloat16 rounding).

``reference_ops()`` turns them all off within a ``with`` block (a context variable: the models traced or called
inside it take the plain path); ``plain_autodiff()`` only the lean gradients. Also here: ``keep_mask`` draws a
dropout mask from a seed tensor (stateless; on TensorFlow with Philox and 16 bits per entry: TF's default algorithm
is lowered by XLA on CPU to a generator about 100x slower), and ``remat`` recomputes a function in the backward
pass with the same random masks.

Shapes: B = batch, T = tokens, N = heads, dh = head size, M = MLP size.
"""

import contextlib
import contextvars
import functools
import math

import keras
import numpy as np
from keras import ops

SPEED_PATHS = ("lean_gradients", "native_layer_norm", "fused_projections", "fused_attention", "fused_bias",
               "half_softmax", "gelu_swap")
_OFF = contextvars.ContextVar("keras_vit_speed_paths_off", default=frozenset())


@contextlib.contextmanager
def speed_paths_off(*names):
    """Within the context, the speed paths ``names`` (of ``SPEED_PATHS``) are off for models traced or called."""
    unknown = set(names) - set(SPEED_PATHS)
    if unknown:
        raise ValueError(f"Unknown speed paths {sorted(unknown)}: the paths are {SPEED_PATHS}.")
    token = _OFF.set(_OFF.get() | frozenset(names))
    try:
        yield
    finally:
        _OFF.reset(token)


def reference_ops():
    """A context manager: models traced or called within it compute the plain formulas, every speed path off.

    ``softmax(q k^T / sqrt(dh)) v`` with q, k, v from their own projections, LayerNorm and GELU by ``keras.ops``,
    plain autodiff gradients; the softmax in float32 under mixed precision, as on the fast path. Use it to check
    the fast path, or a new backend or device, against the formulas. State lives in a context variable: nothing
    outside the ``with`` block changes (a model traced inside keeps the plain path it was traced with).
    """
    return speed_paths_off(*SPEED_PATHS)


def plain_autodiff():
    """A context manager: within it models use the plain autodiff gradients of GELU, LayerNorm and attention."""
    return speed_paths_off("lean_gradients")


def enabled(path):
    """Whether the speed path ``path`` (of ``SPEED_PATHS``) is on here (all are, outside ``speed_paths_off``)."""
    return path not in _OFF.get()


def lean_gradients():
    """Whether the lean gradients are on (the default; off inside ``plain_autodiff()`` and ``reference_ops()``)."""
    return enabled("lean_gradients")


def fused_projections():
    """Whether the attention may fuse its projections (off inside ``reference_ops()``)."""
    return enabled("fused_projections")


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
    return (enabled("gelu_swap") and keras.backend.backend() == "torch" and keras.backend.standardize_dtype(x.dtype) == "bfloat16"
            and x.device.type == "cpu")


QUICK_GELU = 1.702  # OpenAI CLIP's "quick" GELU: x * sigmoid(1.702 x)


def _plain_gelu(x, form):
    if form == "quick":
        return x * ops.sigmoid(QUICK_GELU * x)
    if form == "tanh":
        return ops.gelu(x, approximate=not _exact_kernel_for_tanh(x))
    # Written with erf so that it exports to ONNX (TensorFlow's own exact-GELU op does not).
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_derivative(x, form):
    """d gelu(x) / dx, elementwise, written differently from the forward ops (so that none are merged)."""
    if form == "quick":
        s = ops.sigmoid(QUICK_GELU * x)
        return s * (1.0 + QUICK_GELU * x * (1.0 - s))
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
    """GELU, ``"tanh"`` (the official approximation), ``"erf"`` (exact) or ``"quick"`` (CLIP's x * sigmoid(1.702 x)):
    any shape; the gradient keeps only ``x``."""
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
    if native_gradients() and enabled("native_layer_norm"):
        import torch

        x = ops.convert_to_tensor(x)
        gamma, beta = ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta)
        if x.dtype == torch.float64 or gamma.dtype != beta.dtype:
            return ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)
        if x.dtype != gamma.dtype and gamma.dtype != torch.float32:
            gamma, beta = gamma.float(), beta.float()
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, epsilon)
    if native_gradients() or not lean_gradients():
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


# Backends whose softmax kernel may take half-precision logits and compute in float32 inside (TensorFlow: oneDNN's
# softmax on CPUs with native bfloat16, AVX-512 BF16 or AMX): there the attention core's softmax runs on the
# half-precision logits as they are, without casting the (B, N, Tq, Tk) tensor to float32 and back
# (benchmarks/RESULTS.md, "Attention core per backend"), where ``half_softmax`` measures that it does.
HALF_SOFTMAX_BACKENDS = ("tensorflow",)
_MANTISSA_BITS = {"bfloat16": 7, "float16": 10}


@functools.cache
def _softmax_keeps_float32(dtype):
    """Whether TensorFlow's softmax of ``dtype`` logits is the float32 softmax rounded to ``dtype`` here, eager and
    in a graph: measured once per process on 257 logits in [-6, 6] (a bfloat16-inside kernel, as oneDNN's on CPUs
    without native bfloat16, is off by up to 4% there; a float32-inside one by at most the rounding step)."""
    import tensorflow as tf

    with tf.init_scope():  # eager, also when called while a graph is traced
        logits = tf.cast(tf.constant(np.linspace(-6.0, 6.0, 257, dtype=np.float32)[None]), dtype)
        expected = tf.cast(tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32)), dtype), tf.float32).numpy()
        softmax = lambda t: tf.cast(tf.nn.softmax(t), tf.float32)  # noqa: E731
        outputs = (softmax(logits).numpy(), tf.function(softmax)(logits).numpy())
    step = 2.0 ** (np.floor(np.log2(np.maximum(expected, 2.0**-126))) - _MANTISSA_BITS[dtype])
    return all(bool(np.all(np.abs(output - expected) <= step)) for output in outputs)


def half_softmax(dtype):
    """Whether the attention softmax runs on ``dtype`` logits as they are: on ``HALF_SOFTMAX_BACKENDS``, for half
    precision, where the kernel computes in float32 inside (``_softmax_keeps_float32``); else logits are cast to
    float32 and the probabilities back."""
    dtype = keras.backend.standardize_dtype(dtype)
    return (dtype in _MANTISSA_BITS and enabled("half_softmax") and keras.backend.backend() in HALF_SOFTMAX_BACKENDS
            and _softmax_keeps_float32(dtype))


def _probabilities(q, k):
    """``softmax(q k^T)`` in q's dtype, computed in float32 for half-precision q: (B, N, Tq, Tk)."""
    if half_softmax(q.dtype):
        return ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), axis=-1)
    return ops.cast(attention_weights(q, k), q.dtype)


def dot_product_attention(q, k, v, return_weights=False, dropout=None):
    """The attention core, ``softmax(q k^T) v`` per head: q (B, N, Tq, dh) already scaled by 1/sqrt(dh), k and v
    (B, N, Tk, dh) -> (context (B, N, Tq, dh), weights (B, N, Tq, Tk) float32 or None).

    ``return_weights``: also the softmax weights (in float32 for half-precision inputs). ``dropout``: a function
    of the probabilities (B, N, Tq, Tk) in q's dtype (attention dropout) applied before the product with v. With
    neither, the fastest path here: the backend's fused kernel (``fused_attention``) or ``attention`` (lean
    gradient, half softmax); with either, or inside ``reference_ops()``, the formula as written.
    """
    if return_weights or dropout is not None:
        weights = attention_weights(q, k)
        probabilities = ops.cast(weights, q.dtype)
        if dropout is not None:
            probabilities = dropout(probabilities)
        return ops.matmul(probabilities, v), (weights if return_weights else None)
    if fused_attention():
        return fused_attention_core(q, k, v), None
    return attention(q, k, v), None


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
    return enabled("fused_attention") and keras.backend.backend() in FUSED_ATTENTION_BACKENDS


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
    return enabled("fused_bias") and keras.backend.backend() in FUSED_BIAS_BACKENDS


def dense(x, kernel, bias):
    """``x @ kernel + bias``: x (N, K), kernel (K, F), bias (F,) or None -> (N, F), one kernel on
    ``FUSED_BIAS_BACKENDS``."""
    if bias is None:
        return ops.matmul(x, kernel)
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
