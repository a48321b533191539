"""Layers against NumPy re-implementations of the official forward pass."""

import numpy as np
import pytest
import keras
from scipy.special import erf

from conftest import np_block, np_gelu_tanh
from keras_vit import layers
from keras_vit.arguments import ArgumentError
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
    with pytest.raises(ArgumentError) as error:
        layers.gelu(x, "relu")
    assert (error.value.name, error.value.value) == ("gelu", "relu")


def _randomize(layer, scale=0.3):
    for variable in layer.weights:
        variable.assign(RNG.normal(scale=scale, size=variable.shape).astype("float32"))


def _block_params(block):
    a, n = block.attention, keras.ops.convert_to_numpy
    params = {f"{part}_{kind}": n(getattr(getattr(a, part), kind))
              for part in ("query", "key", "value", "out") for kind in ("kernel", "bias")}
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
    with pytest.raises(ArgumentError) as error:
        MultiHeadSelfAttention(5)(np.zeros((1, 3, 12), "float32"))
    assert (error.value.name, error.value.value) == ("num_heads", 5)


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
    with pytest.raises(ArgumentError) as error:
        TokenPooling("token", num_prefix_tokens=0)
    assert (error.value.name, error.value.value) == ("num_prefix_tokens", 0)


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


def test_layer_norm_layer_is_keras_layer_normalization_with_a_lean_gradient():
    x = RNG.normal(size=(2, 5, 6)).astype("float32")
    lean = layers.LayerNorm(epsilon=1e-6, name="LayerNorm_0")
    plain = keras.layers.LayerNormalization(epsilon=1e-6)
    lean.build(x.shape)
    plain.build(x.shape)
    _randomize(lean)
    plain.set_weights(lean.get_weights())
    assert [v.path.split("/")[-1] for v in lean.weights] == ["gamma", "beta"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(lean(x)), keras.ops.convert_to_numpy(plain(x)))
    clone = layers.LayerNorm.from_config(lean.get_config())
    assert clone.get_config() == lean.get_config()
    with pytest.raises(ValueError, match="keras.layers.LayerNormalization"):
        layers.LayerNorm(axis=1)


# --- token layout, position embeddings, poolings (new parts) -----------------------------------------------------


def test_register_tokens_are_inserted_after_the_class_token():
    tokens = RNG.normal(size=(2, 6, 8)).astype("float32")
    layer = layers.RegisterTokens(3, offset=1)
    out = keras.ops.convert_to_numpy(layer(tokens))
    registers = keras.ops.convert_to_numpy(layer.registers)
    assert out.shape == (2, 9, 8) and registers.shape == (1, 3, 8)
    np.testing.assert_array_equal(out[:, :1], tokens[:, :1])
    np.testing.assert_array_equal(out[:, 1:4], np.broadcast_to(registers, (2, 3, 8)))
    np.testing.assert_array_equal(out[:, 4:], tokens[:, 1:])
    assert 0 < np.abs(registers).max() < 1e-4  # normal(std 1e-6), timm's init
    with pytest.raises(ArgumentError) as error:
        layers.RegisterTokens(0)
    assert (error.value.name, error.value.value) == ("count", 0)


def _np_sincos(gh, gw, width, temperature=10_000.0):
    """Written from the big_vision fixture README: [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = T^(-k/(D/4-1))."""
    q = width // 4
    omega = temperature ** (-np.arange(q) / (q - 1))
    rows = []
    for y in range(gh):
        for x in range(gw):
            rows.append(np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]))
    return np.array(rows)[None]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_sincos_position_embeddings_follow_big_vision_formula(grid):
    width = 16
    tokens = RNG.normal(size=(2, grid[0] * grid[1], width)).astype("float32")
    layer = layers.SinCos2DPositionEmbs(grid)
    out = keras.ops.convert_to_numpy(layer(tokens))
    expected = _np_sincos(*grid, width)
    np.testing.assert_allclose(layer.table(), expected, atol=1e-6)
    np.testing.assert_allclose(out, tokens + expected, atol=1e-6)
    assert not layer.weights  # computed, not stored
    with pytest.raises(ArgumentError) as error:
        layers.sincos_2d(grid, 10)
    assert (error.value.name, error.value.value) == ("width", 10)


def test_sincos_position_embeddings_equal_the_big_vision_fixture():
    from conftest import big_vision_reference

    ref, config = big_vision_reference("bv_gap_sincos")
    grid = tuple(side // patch for side, patch in zip(ref["images"].shape[1:3], config["patch_size"]))
    np.testing.assert_allclose(layers.sincos_2d(grid, config["width"]), ref["posemb_sincos_2d"], atol=1e-6)


def _np_map_head(tokens, p, prefix=0):
    """big_vision's MAPHead written out: probe attends to the tokens; a + MLP(LN(a)), read at the probe."""
    from conftest import np_attention, np_layer_norm

    x = tokens[:, prefix:]
    probe = np.broadcast_to(p["probe"], (x.shape[0], 1, x.shape[-1]))
    q = np.einsum("btd,dnh->bnth", probe, p["query_kernel"]) + p["query_bias"][None, :, None]
    k = np.einsum("btd,dnh->bnth", x, p["key_kernel"]) + p["key_bias"][None, :, None]
    v = np.einsum("btd,dnh->bnth", x, p["value_kernel"]) + p["value_bias"][None, :, None]
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("bnth,nhd->btd", weights @ v, p["out_kernel"]) + p["out_bias"]
    h = np_layer_norm(a, p["ln_scale"], p["ln_bias"]) @ p["mlp0_kernel"] + p["mlp0_bias"]
    h = np_gelu_tanh(h) @ p["mlp1_kernel"] + p["mlp1_bias"]
    return (a + h)[:, 0], weights


@pytest.mark.parametrize("prefix", [0, 2])
def test_map_head_matches_numpy(prefix):
    tokens = RNG.normal(size=(3, 7 + prefix, 12)).astype("float32")
    head = layers.MAPHead(num_heads=3, mlp_dim=20, num_prefix_tokens=prefix)
    head.build(tokens.shape)
    _randomize(head)
    n = keras.ops.convert_to_numpy
    a = head.attention
    p = {f"{part}_{kind}": n(getattr(getattr(a, part), kind)) for part in ("query", "key", "value", "out")
         for kind in ("kernel", "bias")}
    p.update(probe=n(head.probe), ln_scale=n(head.norm.gamma), ln_bias=n(head.norm.beta),
             mlp0_kernel=n(head.mlp_in.kernel), mlp0_bias=n(head.mlp_in.bias),
             mlp1_kernel=n(head.mlp_out.kernel), mlp1_bias=n(head.mlp_out.bias))
    expected, weights = _np_map_head(tokens.astype("float64"), {k: v.astype("float64") for k, v in p.items()}, prefix)
    np.testing.assert_allclose(n(head(tokens)), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(n(head.attention_weights(tokens)), weights, atol=1e-5)
    assert sorted(head.official_weights()) == sorted("MAPHead_0/" + name for name in
        ["probe", "LayerNorm_0/scale", "LayerNorm_0/bias", "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_0/bias",
         "MlpBlock_0/Dense_1/kernel", "MlpBlock_0/Dense_1/bias"]
        + [f"MultiHeadDotProductAttention_0/{part}/{kind}" for part in ("query", "key", "value", "out")
           for kind in ("kernel", "bias")]
    )


def test_attention_projections_are_einsum_dense_layers_with_the_official_shapes():
    attention = MultiHeadSelfAttention(3)
    attention.build((2, 5, 12))
    for name in ("query", "key", "value"):
        layer = getattr(attention, name)
        assert isinstance(layer, keras.layers.EinsumDense) and layer.name == name
        assert (tuple(layer.kernel.shape), tuple(layer.bias.shape)) == ((12, 3, 4), (3, 4))
    assert (tuple(attention.out.kernel.shape), tuple(attention.out.bias.shape)) == ((3, 4, 12), (12,))
    assert [v.path for v in attention.weights][:2] == [f"{attention.name}/query/kernel", f"{attention.name}/query/bias"]


def test_fused_and_per_projection_paths_compute_the_same_attention():
    # While nothing is quantized or LoRA-enabled the kernels are fused into one product; with LoRA enabled
    # (its second factor starts at zero, so the function is unchanged) each EinsumDense layer runs itself.
    x = RNG.normal(size=(2, 6, 12)).astype("float32")
    attention = MultiHeadSelfAttention(3)
    attention.build(x.shape)
    _randomize(attention)
    fused, fused_weights = (keras.ops.convert_to_numpy(t) for t in attention(x, return_attention_scores=True))
    fused_lean = keras.ops.convert_to_numpy(attention(x))
    for name in ("query", "value"):
        getattr(attention, name).enable_lora(2)
    assert not attention._fused()
    single, single_weights = (keras.ops.convert_to_numpy(t) for t in attention(x, return_attention_scores=True))
    np.testing.assert_allclose(single, fused, atol=1e-5)
    np.testing.assert_allclose(single_weights, fused_weights, atol=1e-6)
    np.testing.assert_allclose(fused_lean, fused, atol=1e-6)


def test_cross_attention_matches_numpy():
    from conftest import np_softmax

    query = RNG.normal(size=(2, 1, 12)).astype("float32")
    source = RNG.normal(size=(2, 5, 12)).astype("float32")
    attention = MultiHeadSelfAttention(3)
    attention.build(query.shape, source.shape)
    _randomize(attention)
    n = keras.ops.convert_to_numpy
    k = {f"{part}_{kind}": n(getattr(getattr(attention, part), kind)).astype("float64")
         for part in ("query", "key", "value", "out") for kind in ("kernel", "bias")}
    q = np.einsum("btd,dnh->bnth", query, k["query_kernel"]) + k["query_bias"][None, :, None]
    kk = np.einsum("btd,dnh->bnth", source, k["key_kernel"]) + k["key_bias"][None, :, None]
    v = np.einsum("btd,dnh->bnth", source, k["value_kernel"]) + k["value_bias"][None, :, None]
    weights = np_softmax(q @ kk.transpose(0, 1, 3, 2) / 2.0)  # sqrt(dh) = sqrt(4)
    expected = np.einsum("bnth,nhd->btd", weights @ v, k["out_kernel"]) + k["out_bias"]
    out, got_weights = attention(query, source, return_attention_scores=True)
    np.testing.assert_allclose(n(out), expected, atol=1e-5)
    assert got_weights.shape == (2, 3, 1, 5)
