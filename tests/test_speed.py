"""The training-speed machinery (keras_vit._speed): lean gradients equal plain autodiff's, what a step keeps,
dropout masks drawn from a seed, and remat replaying them."""

import numpy as np
import pytest
import keras
from scipy.special import erf

from conftest import graph_ancestors
from keras_vit import _speed, layers
from keras_vit.layers import TransformerBlock

tensorflow_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="gradients via tf.GradientTape")


def _input_gradient(block, x, weights_too=False):
    import tensorflow as tf

    x = tf.constant(x)
    cotangent = tf.constant(np.random.default_rng(5).normal(size=x.shape), x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(block(x, training=True) * cotangent)
    return loss, tape.gradient(loss, [x, *block.trainable_variables] if weights_too else x), cotangent


def _plain_and_remat_blocks(shape):
    """Two blocks with the same weights, the second with remat=True."""
    plain, remat = TransformerBlock(2, 16), TransformerBlock(2, 16, remat=True)
    plain.build(shape)
    remat.build(shape)
    remat.set_weights(plain.get_weights())
    return plain, remat


@tensorflow_only
def test_remat_block_has_the_plain_block_gradients():
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    plain, remat = _plain_and_remat_blocks(x.shape)
    _, expected, _ = _input_gradient(plain, x, weights_too=True)
    _, actual, _ = _input_gradient(remat, x, weights_too=True)
    assert len(actual) == 1 + len(remat.trainable_variables) == 17  # input + 16 weights
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5)


@tensorflow_only
def test_remat_recomputation_reuses_the_dropout_and_drop_path_masks():
    # Central finite differences of the same random draw (the seed state is reset
    # before each call) must agree with the gradient: masks drawn again during the
    # recomputation would give the gradient of another network.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6, 8))
    block = TransformerBlock(2, 16, dropout_rate=0.3, attention_dropout_rate=0.2, stochastic_depth_rate=0.4, remat=True,
                             seed=3, dtype="float64")
    block.build(x.shape)
    state = np.asarray(block.seed_generator.state)

    def run(inputs):
        block.seed_generator.state.assign(state)
        return _input_gradient(block, inputs)

    loss, gradient, cotangent = run(x)
    inference_loss = np.sum(np.asarray(block(x, training=False)) * np.asarray(cotangent))
    assert not np.isclose(float(loss), inference_loss)  # the masks are in effect
    direction = rng.normal(size=x.shape)
    eps = 1e-3
    slope = (float(run(x + eps * direction)[0]) - float(run(x - eps * direction)[0])) / (2 * eps)
    np.testing.assert_allclose(slope, float(np.sum(np.asarray(gradient) * direction)), rtol=1e-3)


def test_remat_block_forward_equals_the_plain_block_on_every_backend():
    x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype("float32")
    plain, remat = _plain_and_remat_blocks(x.shape)
    expected = keras.ops.convert_to_numpy(plain(x, training=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(remat(x, training=True)), expected, atol=1e-6)
    assert TransformerBlock.from_config(remat.get_config()).remat is True


# --- dropout masks (_speed.keep_mask, layers.Dropout) ------------------------------------------------------------


def _masks(rate, shape, draws=1, seed=7, salt=0):
    generator = keras.random.SeedGenerator(seed)
    return [keras.ops.convert_to_numpy(_speed.keep_mask(shape, rate, generator.next(), salt, "float32"))
            for _ in range(draws)]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_entry_with_probability_one_minus_rate_and_has_mean_one(rate):
    mask = _masks(rate, (301, 333))[0]  # an odd entry count: the last 32-bit draw is used by half
    scale = mask.max()
    assert set(np.unique(mask)) == {0.0, scale}
    np.testing.assert_allclose(scale, 1 / (1 - rate), rtol=1e-4)  # keep within 2^-17 of 1 - rate
    kept = (mask > 0).mean()
    sigma = np.sqrt(rate * (1 - rate) / mask.size)
    assert abs(kept - (1 - rate)) < 5 * sigma
    assert abs(mask.mean() - 1) < 5 * sigma * scale


def test_keep_mask_entries_are_independent_of_their_neighbours():
    # On TensorFlow two entries share one 32-bit random number (16 bits each): neighbours must still be
    # independent, so both are dropped with probability rate**2 and the kept count of a row is binomial.
    dropped = _masks(0.5, (20_000, 16))[0] == 0
    pairs = dropped[:, 0::2] & dropped[:, 1::2]
    assert abs(pairs.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / pairs.size)
    per_row = dropped.sum(axis=1)
    np.testing.assert_allclose(per_row.var(), 16 * 0.25, rtol=0.05)  # binomial(16, 0.5) variance


def test_keep_mask_is_reproducible_from_the_seed_and_differs_between_draws_and_salts():
    first, second = _masks(0.3, (64, 48), draws=2)
    again, _ = _masks(0.3, (64, 48), draws=2)
    (salted,) = _masks(0.3, (64, 48), salt=1)
    np.testing.assert_array_equal(first, again)
    assert (first != second).mean() > 0.2  # two draws disagree on about 2 * 0.3 * 0.7 of the entries
    assert (first != salted).mean() > 0.2  # as do two salts of one seed


def test_keep_mask_of_each_salt_and_draw_is_its_own():
    # A block draws its masks from one seed per call, told apart by salts: no (draw, salt) may repeat another's
    # mask, e.g. the MLP's drop path (salt 1) of one call as the attention's (salt 0) of the next, which
    # SeedGenerator's counter stepping by 1 had made identical on TensorFlow.
    rate, size = 0.5, 4096
    masks = {(draw, salt): mask.ravel()
             for salt in range(6) for draw, mask in enumerate(_masks(rate, (size, 1, 1), draws=4, salt=salt))}
    keys = list(masks)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            disagree = (masks[first] != masks[second]).mean()  # 2 * rate * (1 - rate) for independent masks
            assert abs(disagree - 0.5) < 5 * np.sqrt(0.25 / size), (first, second, disagree)


@tensorflow_only
def test_keep_mask_is_the_same_inside_and_outside_xla():
    import tensorflow as tf

    generator = keras.random.SeedGenerator(11)
    state = np.asarray(generator.state)

    def draw():
        return _speed.keep_mask((2, 17, 64), 0.1, generator.next(), 3, "float32")

    graph = tf.function(draw)().numpy()
    generator.state.assign(state)
    xla = tf.function(draw, jit_compile=True)().numpy()
    np.testing.assert_array_equal(xla, graph)


def test_dropout_layer_zeroes_at_the_rate_only_in_training_and_follows_noise_shape():
    x = np.ones((64, 10, 32), "float32")
    layer = layers.Dropout(0.25, noise_shape=(None, 1, None), seed=5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1], out.shape))  # one mask for every token
    assert abs((out[:, 0] == 0).mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / (64 * 32))
    restored = layers.Dropout.from_config(layer.get_config())
    assert (restored.rate, restored.noise_shape) == (0.25, (None, 1, None))


# --- memory-lean gradients (_speed.gelu, layer_norm, attention): the plain computation's numbers ------------------

BACKEND = keras.backend.backend()
float64_backends = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="float64 needs JAX's process-wide x64 switch; Keras' PyTorch matmul returns float32 for float64 tensors",
)


def _vjp(function, inputs, cotangent):
    """Gradients of ``sum(function(*inputs) * cotangent)`` with respect to every input, as NumPy arrays."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = [tf.constant(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(function(*inputs) * cotangent)
        return [g.numpy() for g in tape.gradient(loss, inputs)]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        loss = lambda *xs: jnp.sum(function(*xs) * cotangent)  # noqa: E731
        return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(len(inputs))))(*map(jnp.asarray, inputs))]
    import torch

    inputs = [torch.tensor(x, requires_grad=True) for x in inputs]
    loss = torch.sum(function(*inputs) * torch.tensor(cotangent))
    return [g.numpy() for g in torch.autograd.grad(loss, inputs)]


def _plain_attention(q, k, v):
    softmax_dtype = "float32" if keras.backend.standardize_dtype(q.dtype) == "bfloat16" else q.dtype
    weights = keras.ops.softmax(keras.ops.cast(keras.ops.matmul(q, keras.ops.transpose(k, (0, 1, 3, 2))), softmax_dtype))
    return keras.ops.matmul(keras.ops.cast(weights, q.dtype), v)


LEAN_AND_PLAIN = {  # name: (lean function, plain function, input shapes)
    "gelu_tanh": (lambda x: _speed.gelu(x, "tanh"), lambda x: keras.ops.gelu(x, approximate=True), [(3, 7, 11)]),
    "gelu_erf": (
        lambda x: _speed.gelu(x, "erf"),
        lambda x: 0.5 * x * (1.0 + keras.ops.erf(x * float(1.0 / np.sqrt(2.0)))),
        [(3, 7, 11)],
    ),
    "layer_norm": (
        lambda x, g, b: _speed.layer_norm(x, g, b, layers.LAYER_NORM_EPSILON),
        lambda x, g, b: keras.ops.layer_normalization(x, g, b, epsilon=layers.LAYER_NORM_EPSILON),
        [(3, 7, 11), (11,), (11,)],
    ),
    "attention": (_speed.attention, _plain_attention, [(2, 3, 9, 4)] * 3),
}


def _lean_case(name, dtype, seed=0):
    lean, plain, shapes = LEAN_AND_PLAIN[name]
    rng = np.random.default_rng(seed)
    inputs = [(2.0 * rng.normal(size=shape)).astype(dtype) for shape in shapes]
    cotangent = rng.normal(size=shapes[0]).astype(dtype)
    return lean, plain, inputs, cotangent


@pytest.mark.parametrize("name", sorted(LEAN_AND_PLAIN))
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=float64_backends)])
def test_lean_gradient_equals_the_plain_gradient(name, dtype):
    lean, plain, inputs, cotangent = _lean_case(name, dtype)
    to_numpy = keras.ops.convert_to_numpy
    tensors = [keras.ops.convert_to_tensor(x) for x in inputs]
    np.testing.assert_array_equal(to_numpy(lean(*tensors)), to_numpy(plain(*tensors)))  # the same forward ops
    tolerance = {"float32": 2e-5, "float64": 1e-8}[dtype]
    for actual, expected in zip(_vjp(lean, inputs, cotangent), _vjp(plain, inputs, cotangent)):
        assert actual.dtype == expected.dtype
        np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_lean_gelu_gradient_is_the_closed_form_derivative(form):
    x = np.linspace(-6.0, 6.0, 241)
    if form == "tanh":
        c, a = np.sqrt(2.0 / np.pi), 0.044715
        t = np.tanh(c * (x + a * x**3))
        expected = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)
    else:
        expected = 0.5 * (1.0 + erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    dtype = "float32" if BACKEND == "jax" else "float64"
    (actual,) = _vjp(lambda v: _speed.gelu(v, form), [x.astype(dtype)], np.ones_like(x, dtype))
    np.testing.assert_allclose(actual, expected, atol={"float32": 1e-5, "float64": 1e-12}[dtype])


def test_attention_probabilities_of_bfloat16_are_the_float32_softmax_rounded():
    # TensorFlow's softmax runs on the bfloat16 logits (float32 inside); the other backends cast to float32 and back
    rng = np.random.default_rng(0)
    q, k = (keras.ops.cast(3.0 * rng.normal(size=(2, 3, 17, 8)), "bfloat16") for _ in range(2))
    logits = keras.ops.cast(keras.ops.matmul(q, keras.ops.transpose(k, (0, 1, 3, 2))), "float32")
    expected = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(keras.ops.softmax(logits, -1), "bfloat16"), "float32"))
    actual = keras.ops.convert_to_numpy(keras.ops.cast(_speed._probabilities(q, k), "float32"))
    step = 2.0 ** (np.floor(np.log2(np.maximum(expected, 2.0**-126))) - 7)
    assert np.all(np.abs(actual - expected) <= step)


def test_bfloat16_gelu_is_the_tanh_form_within_its_rounding_and_the_forms_distance():
    # On PyTorch CPUs the tanh form of bfloat16 input runs on the exact (erf) kernel: within 4.7e-4 of the tanh form.
    x = keras.ops.cast(np.linspace(-8.0, 8.0, 4001), "bfloat16")
    values = keras.ops.convert_to_numpy(keras.ops.cast(x, "float64"))
    c = np.sqrt(2.0 / np.pi)
    expected = 0.5 * values * (1.0 + np.tanh(c * (values + 0.044715 * values**3)))
    actual = keras.ops.convert_to_numpy(keras.ops.cast(_speed.gelu(x, "tanh"), "float64"))
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(expected), 2.0**-126))) - 7)  # bfloat16's spacing there
    # TensorFlow and JAX compute the tanh form in bfloat16 steps (1 + tanh(z) loses the tail: up to ~0.007 off);
    # PyTorch's exact kernel rounds once
    tail = 4.8e-4 if BACKEND == "torch" else 8e-3
    assert np.all(np.abs(actual - expected) <= step + tail)
    assert not np.allclose(actual, np.maximum(values, 0.0), atol=1e-2)  # GELU, not ReLU


@pytest.mark.parametrize("name", sorted(LEAN_AND_PLAIN))
def test_lean_gradient_in_bfloat16_is_the_float32_gradient_rounded(name):
    # Half-precision inputs: the gradient is computed in float32 from the bfloat16 values and rounded once.
    lean, _, inputs, cotangent = _lean_case(name, "float32", seed=1)
    to_bf16 = lambda *xs: [keras.ops.cast(x, "bfloat16") for x in xs]  # noqa: E731
    rounded = [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in to_bf16(*inputs)]
    half = lambda *xs: keras.ops.cast(lean(*to_bf16(*xs)), "float32")  # noqa: E731
    full = lambda *xs: keras.ops.cast(keras.ops.cast(lean(*xs), "bfloat16"), "float32")  # noqa: E731
    for actual, expected in zip(_vjp(half, inputs, cotangent), _vjp(full, rounded, cotangent)):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(actual, expected, atol=0.02 * scale)  # bfloat16 has 8 significant bits


def _block_loss_and_gradients(block, x, cotangent):
    """sum(block(x, training=True) * cotangent) and its gradients for x and every trainable weight (TensorFlow)."""
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(block(x, training=True) * cotangent)
    return float(loss), [np.asarray(g) for g in tape.gradient(loss, [x, *block.trainable_variables])]


@float64_backends
@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_block_gradient_matches_float64_finite_differences(form):
    # One central difference along a random direction of (input, every weight) against the gradient.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 6, 12))
    block = TransformerBlock(3, 20, gelu=form, dtype="float64")
    block.build(x.shape)
    for variable in block.trainable_variables:
        variable.assign(rng.normal(scale=0.4, size=variable.shape))
    weights = [keras.ops.convert_to_numpy(v) for v in block.trainable_variables]
    cotangent = rng.normal(size=x.shape)
    _, gradients = _block_loss_and_gradients(block, x, cotangent)
    directions = [rng.normal(size=g.shape) for g in gradients]

    def loss_at(step):
        for variable, weight, direction in zip(block.trainable_variables, weights, directions[1:]):
            variable.assign(weight + step * direction)
        return _block_loss_and_gradients(block, x + step * directions[0], cotangent)[0]

    eps = 1e-5
    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(slope, sum(np.sum(g * d) for g, d in zip(gradients, directions)), rtol=1e-7)
    assert len(gradients) == 1 + 16


@tensorflow_only
def test_block_gradient_keeps_only_the_inputs_of_gelu_layernorm_and_softmax():
    # The forward tensors that a traced training step's gradient reads: none of the recomputed intermediates,
    # and of the (B*T, M) MLP width only the GELU input and output (the next product needs the output).
    import tensorflow as tf

    batch, tokens, hidden, mlp = 2, 5, 8, 20
    block = TransformerBlock(2, mlp)
    block.build((batch, tokens, hidden))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(block(x, training=True) ** 2)
        return loss, tape.gradient(loss, [x, *block.trainable_variables])

    graph = step.get_concrete_function(tf.TensorSpec((batch, tokens, hidden))).graph

    def buffer(tensor):  # the tensor a view (reshape, identity) reads
        while tensor.op.type in ("Reshape", "Identity", "IdentityN") and tensor.op.inputs:
            tensor = tensor.op.inputs[tensor.value_index if tensor.op.type == "IdentityN" else 0]
        return tensor

    forward = graph_ancestors([graph.outputs[0].op])
    live = graph_ancestors([t.op for t in graph.outputs[1:]])
    kept = {
        buffer(t).name: buffer(t)
        for op in graph.get_operations() if op.name in live and op.name not in forward
        for t in op.inputs if t.op.name in forward
    }
    kept_types = {t.op.type for t in kept.values()}
    assert not kept_types & {"Softmax", "Tanh", "Pow", "Rsqrt", "SquaredDifference"}, kept_types
    mlp_wide = sorted(t.op.type for t in kept.values() if t.shape.as_list() == [batch * tokens, mlp])
    assert mlp_wide == ["BiasAdd", "Mul"]  # Dense_0's output (the GELU input) and the GELU output
    assert not [t for t in kept.values() if t.shape.rank == 4 and t.shape[-1] == t.shape[-2] == tokens]  # (B,N,T,T)


@tensorflow_only
def test_attention_gradient_recomputes_the_probabilities_under_xla():
    # XLA drops control dependencies and merges identical ops: unless the recomputation reads tensors that
    # depend on the incoming gradient, it becomes the forward softmax and the (B, N, T, T) probabilities stay
    # alive until the backward pass. A step that needs the forward output and the gradients must compute the
    # softmax's exponential twice.
    import re

    import tensorflow as tf

    lean, _, inputs, cotangent = _lean_case("attention", "float32")

    @tf.function(jit_compile=True)
    def value_and_gradients(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(lean(q, k, v) * cotangent)
        return loss, tape.gradient(loss, [q, k, v])

    tensors = [tf.constant(x) for x in inputs]
    hlo = value_and_gradients.experimental_get_compiler_ir(*tensors)(stage="optimized_hlo")
    assert len(re.findall(r"\bexponential\(", hlo)) == 2
    _, gradients = value_and_gradients(*tensors)
    for actual, expected in zip(gradients, _vjp(lean, inputs, cotangent)):  # the same numbers as without XLA
        np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-5, atol=2e-5)




def test_plain_autodiff_switch_gives_the_plain_gradients_with_the_same_numbers():
    # One switch turns the lean gradients off everywhere: the block's input gradient is the same either way.
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    block = TransformerBlock(2, 16)
    block.build(x.shape)
    cotangent = np.random.default_rng(4).normal(size=x.shape).astype("float32")
    (lean,) = _vjp(lambda v: block(v, training=True), [x], cotangent)
    with _speed.plain_autodiff():
        assert not _speed.lean_gradients()
        (plain,) = _vjp(lambda v: block(v, training=True), [x], cotangent)
    assert _speed.lean_gradients()
    np.testing.assert_allclose(lean, plain, rtol=2e-5, atol=2e-5)


@tensorflow_only
def test_plain_autodiff_keeps_what_the_lean_gradients_recompute():
    import tensorflow as tf

    block = TransformerBlock(2, 20)
    block.build((2, 5, 8))

    def kept_types():
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(block(x, training=True) ** 2)
            return loss, tape.gradient(loss, x)

        graph = step.get_concrete_function(tf.TensorSpec((2, 5, 8))).graph
        forward = graph_ancestors([graph.outputs[0].op])
        live = graph_ancestors([graph.outputs[1].op])
        return {t.op.type for op in graph.get_operations() if op.name in live and op.name not in forward
                for t in op.inputs if t.op.name in forward}

    assert "Softmax" not in kept_types()
    with _speed.plain_autodiff():
        assert "Softmax" in kept_types()
