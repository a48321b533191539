"""Layers against NumPy re-implementations of the official forward pass."""

import numpy as np
import pytest
import keras
from scipy.special import erf

from conftest import np_block, np_gelu_tanh
from keras_vit import layers
from keras_vit.layers import AddPositionEmbs, ClassToken, MultiHeadSelfAttention, Patches, TokenPooling, TransformerBlock

RNG = np.random.default_rng(0)


def test_patches_row_major_rectangular():
    images = RNG.uniform(-1, 1, (2, 8, 12, 3)).astype("float32")
    layer = Patches((2, 3), 5)
    out = keras.ops.convert_to_numpy(layer(images))
    assert out.shape == (2, 4 * 4, 5)
    kernel = keras.ops.convert_to_numpy(layer.kernel).reshape(-1, 5)
    bias = keras.ops.convert_to_numpy(layer.bias)
    for row in range(4):
        for col in range(4):
            patch = images[:, row * 2 : row * 2 + 2, col * 3 : col * 3 + 3, :].reshape(2, -1)
            np.testing.assert_allclose(out[:, row * 4 + col], patch @ kernel + bias, atol=1e-5)


@pytest.mark.parametrize("shape, message", [((1, 30, 32, 3), "height 30.*patch height 4"), ((1, 32, 18, 3), "width 18.*patch width 4")])
def test_patches_non_divisible_side_is_an_error(shape, message):
    with pytest.raises(ValueError, match=message):
        Patches(4, 8)(np.zeros(shape, "float32"))


def test_class_token_prepends_learnable_zero_token():
    tokens = RNG.normal(size=(3, 5, 4)).astype("float32")
    layer = ClassToken()
    out = keras.ops.convert_to_numpy(layer(tokens))
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_array_equal(out[:, 1:], tokens)
    layer.cls.assign(np.arange(4, dtype="float32").reshape(1, 1, 4))
    out = keras.ops.convert_to_numpy(layer(tokens))
    np.testing.assert_array_equal(out[:, 0], np.broadcast_to(np.arange(4.0), (3, 4)))


def test_position_embeddings_init_and_add():
    layer = AddPositionEmbs()
    tokens = RNG.normal(size=(2, 400, 64)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(tokens))
    posemb = keras.ops.convert_to_numpy(layer.pos_embedding)
    assert posemb.shape == (1, 400, 64)
    assert abs(posemb.std() - 0.02) < 0.001 and abs(posemb.mean()) < 0.001
    np.testing.assert_allclose(out, tokens + posemb, atol=1e-6)


def test_gelu_forms():
    x = np.linspace(-5, 5, 101).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layers.gelu(x, "tanh")), np_gelu_tanh(x), atol=1e-6)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layers.gelu(x, "erf")), exact, atol=1e-6)
    assert np.abs(np_gelu_tanh(x) - exact).max() > 1e-4  # the two forms really differ
    with pytest.raises(ValueError, match="gelu"):
        layers.gelu(x, "relu")


def _randomize(layer, scale=0.3):
    for variable in layer.weights:
        variable.assign(RNG.normal(scale=scale, size=variable.shape).astype("float32"))


def _block_params(block):
    a, n = block.attention, keras.ops.convert_to_numpy
    params = {name: n(getattr(a, name)) for name in (
        "query_kernel", "query_bias", "key_kernel", "key_bias", "value_kernel", "value_bias", "out_kernel", "out_bias")}
    params.update(
        ln0_scale=n(block.norm_attention.gamma), ln0_bias=n(block.norm_attention.beta),
        ln2_scale=n(block.norm_mlp.gamma), ln2_bias=n(block.norm_mlp.beta),
        mlp0_kernel=n(block.mlp_in.kernel), mlp0_bias=n(block.mlp_in.bias),
        mlp1_kernel=n(block.mlp_out.kernel), mlp1_bias=n(block.mlp_out.bias),
    )
    return {k: v.astype("float64") for k, v in params.items()}


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_transformer_block_matches_numpy(form):
    x = RNG.normal(size=(2, 7, 12)).astype("float32")
    block = TransformerBlock(num_heads=3, mlp_dim=20, gelu=form)
    block.build(x.shape)
    _randomize(block)
    out, weights = block(x, return_attention_scores=True)
    gelu = np_gelu_tanh if form == "tanh" else (lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
    expected, expected_weights = np_block(x.astype("float64"), _block_params(block), gelu)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, atol=1e-4, rtol=1e-4)
    assert weights.shape == (2, 3, 7, 7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights), expected_weights, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)), expected, atol=1e-4, rtol=1e-4)


def test_attention_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        MultiHeadSelfAttention(5)(np.zeros((1, 3, 12), "float32"))


def test_stochastic_depth_drops_whole_samples_in_training_only():
    x = RNG.normal(size=(4000, 3, 8)).astype("float32")
    block = TransformerBlock(num_heads=2, mlp_dim=8, stochastic_depth_rate=0.5, seed=1)
    block.build(x.shape)
    _randomize(block)
    reference = TransformerBlock(num_heads=2, mlp_dim=8)
    reference.build(x.shape)
    reference.set_weights(block.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(block(x, training=False)), keras.ops.convert_to_numpy(reference(x)), atol=1e-6
    )
    out = keras.ops.convert_to_numpy(block(x, training=True))
    untouched = np.all(out == x, axis=(1, 2)).mean()  # both branches dropped: probability 0.25
    assert abs(untouched - 0.25) < 0.03


def test_token_pooling():
    tokens = RNG.normal(size=(2, 5, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(TokenPooling("token")(tokens)), tokens[:, 0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(TokenPooling("gap", 1)(tokens)), tokens[:, 1:].mean(1), atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(TokenPooling("gap", 0)(tokens)), tokens.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="class token"):
        TokenPooling("token", num_prefix_tokens=0)


@pytest.mark.parametrize(
    "layer",
    [
        Patches((4, 2), 16, name="embedding"),
        ClassToken(name="cls"),
        AddPositionEmbs(name="posembed_input"),
        MultiHeadSelfAttention(4, dropout_rate=0.1),
        TransformerBlock(4, 32, dropout_rate=0.1, attention_dropout_rate=0.2, stochastic_depth_rate=0.3, gelu="erf", seed=3),
        TokenPooling("gap", 0),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    registered = keras.saving.get_registered_object(f"keras_vit>{type(layer).__name__}")
    assert registered is type(layer)


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
    block = TransformerBlock(2, 16, dropout_rate=0.3, stochastic_depth_rate=0.4, remat=True, seed=3, dtype="float64")
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


def test_remat_refuses_attention_dropout():
    with pytest.raises(ValueError, match="attention_dropout_rate=0"):
        TransformerBlock(2, 16, attention_dropout_rate=0.1, remat=True)


def test_remat_block_forward_equals_the_plain_block_on_every_backend():
    x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype("float32")
    plain, remat = _plain_and_remat_blocks(x.shape)
    expected = keras.ops.convert_to_numpy(plain(x, training=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(remat(x, training=True)), expected, atol=1e-6)
    assert TransformerBlock.from_config(remat.get_config()).remat is True
