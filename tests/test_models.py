"""The builder and named constructors: parameter counts, outputs, initialisers, errors."""

import gc

import keras
import numpy as np
import pytest

import keras_vit

# google-research/vision_transformer models_test.py, 224 px, 1000 classes.
OFFICIAL_PARAMETER_COUNTS = {
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-S_32": 22_878_952,
    "ViT-B_8": 86_576_872,
    "ViT-B_16": 86_567_656,
    "ViT-B_32": 88_224_232,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-H_14": 632_045_800,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-S_14": 22_004_584,  # patch-14 variants of timm's weights: timm's counts (results-imagenet.csv, L/14 CLIP
    "ViT-B_14": 86_475_496,  # 304.20 M) differ by its CLIP models' pre-norm (+2 D) and patch bias (-D)
    "ViT-L_14": 304_203_752,
}
CONSTRUCTORS = {
    "ViT-Ti_16": keras_vit.ViT_Ti16, "ViT-S_16": keras_vit.ViT_S16, "ViT-S_32": keras_vit.ViT_S32,
    "ViT-B_8": keras_vit.ViT_B8, "ViT-B_16": keras_vit.ViT_B16, "ViT-B_32": keras_vit.ViT_B32,
    "ViT-L_16": keras_vit.ViT_L16, "ViT-L_32": keras_vit.ViT_L32, "ViT-H_14": keras_vit.ViT_H14,
    "ViT-S_14": keras_vit.ViT_S14, "ViT-B_14": keras_vit.ViT_B14, "ViT-L_14": keras_vit.ViT_L14,
}
TINY = dict(image_size=16, patch_size=4, hidden_size=12, num_layers=2, num_heads=3, mlp_dim=24)


@pytest.mark.parametrize("name", OFFICIAL_PARAMETER_COUNTS)
def test_official_parameter_counts(name):
    build = CONSTRUCTORS.get(name, lambda: keras_vit.create_model(name))
    model = build()
    assert model.count_params() == OFFICIAL_PARAMETER_COUNTS[name]
    del model
    gc.collect()


def test_layer_names_mirror_official_tree():
    model = keras_vit.vision_transformer(**TINY, representation_size=8, classes=5)
    names = [layer.name for layer in model.layers]
    for expected in ("embedding", "cls", "posembed_input", "encoderblock_0", "encoderblock_1", "encoder_norm", "pre_logits", "head"):
        assert expected in names
    assert isinstance(model.get_layer("encoderblock_1"), keras_vit.TransformerBlock)


def test_initialisers_follow_official_code():
    model = keras_vit.vision_transformer(image_size=32, patch_size=4, hidden_size=96, num_layers=1, num_heads=4, mlp_dim=384, classes=7)
    n = keras.ops.convert_to_numpy
    assert not n(model.get_layer("head").kernel).any() and not n(model.get_layer("head").bias).any()
    assert not n(model.get_layer("cls").cls).any()
    block = model.get_layer("encoderblock_0")
    limit = np.sqrt(6 / (96 + 96))  # xavier uniform over the flattened (D, N*dh) matrix
    query = n(block.attention.query.kernel)
    assert np.abs(query).max() <= limit and np.abs(query).max() > 0.9 * limit
    mlp_limit = np.sqrt(6 / (96 + 384))
    assert np.abs(n(block.mlp_in.kernel)).max() <= mlp_limit
    assert 0 < np.abs(n(block.mlp_in.bias)).max() < 1e-5  # normal(std 1e-6)
    patch = n(model.get_layer("embedding").kernel)  # lecun normal: std sqrt(1 / fan_in), truncated
    assert abs(patch.std() - np.sqrt(1 / (4 * 4 * 3))) < 0.02
    logits = model(np.zeros((2, 32, 32, 3), "float32"))
    assert not n(logits).any()  # zero-initialised head


@pytest.mark.parametrize("initializer", ["glorot_uniform", keras.initializers.GlorotUniform(seed=3)])
def test_attention_projections_are_independent_xavier_draws(initializer):
    # flax draws query, key, value and out apart, each xavier-uniform over its flattened (D, D) matrix: bound
    # sqrt(6 / (D + D)), standard deviation bound / sqrt(3). One initializer instance repeats its values, which
    # had made all four equal (the main job's pre-training started from q = k = v).
    hidden, heads = 64, 4
    attention = keras_vit.layers.MultiHeadSelfAttention(heads, kernel_initializer=initializer)
    attention.build((None, 17, hidden))
    limit = np.sqrt(6 / (hidden + hidden))
    kernels = {}
    for name in ("query", "key", "value", "out"):
        kernel = keras.ops.convert_to_numpy(getattr(attention, name).kernel).reshape(hidden, hidden)
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
        sigma = limit / np.sqrt(3)
        assert abs(kernel.std() - sigma) < 5 * sigma / np.sqrt(2 * kernel.size)
        kernels[name] = kernel.ravel()
    names = list(kernels)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            correlation = np.corrcoef(kernels[first], kernels[second])[0, 1]
            assert abs(correlation) < 5 / np.sqrt(hidden * hidden), (first, second, correlation)


def test_include_top_and_pooling_outputs():
    assert keras_vit.vision_transformer(**TINY, classes=5).output.shape == (None, 5)
    assert keras_vit.vision_transformer(**TINY, include_top=False).output.shape == (None, 17, 12)
    assert keras_vit.vision_transformer(**TINY, include_top=False, pooling="token").output.shape == (None, 12)
    assert keras_vit.vision_transformer(**TINY, include_top=False, pooling="avg").output.shape == (None, 12)
    gap = keras_vit.vision_transformer(**TINY, classifier="gap", include_top=False)
    assert gap.output.shape == (None, 16, 12) and "cls" not in [layer.name for layer in gap.layers]
    rep = keras_vit.vision_transformer(**TINY, include_top=False, pooling="token", representation_size=7)
    assert rep.output.shape == (None, 7)
    unpooled = keras_vit.vision_transformer(**TINY, classifier="unpooled", include_top=False)
    assert unpooled.output.shape == (None, 16, 12)


def test_gap_pooling_of_a_token_model_excludes_the_class_token():
    tokens_model = keras_vit.vision_transformer(**TINY, include_top=False)
    pooled_model = keras_vit.vision_transformer(**TINY, include_top=False, pooling="gap")
    pooled_model.set_weights(tokens_model.get_weights())
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    tokens = keras.ops.convert_to_numpy(tokens_model(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pooled_model(images)), tokens[:, 1:].mean(1), atol=1e-5)


def test_softmax_activation_and_rectangular_input():
    model = keras_vit.create_model("Ti/16", image_size=(64, 32), classes=3, classifier_activation="softmax", num_layers=1)
    assert model.get_layer("posembed_input").pos_embedding.shape == (1, 1 + 4 * 2, 192)
    probabilities = keras.ops.convert_to_numpy(model(np.zeros((2, 64, 32, 3), "float32")))
    np.testing.assert_allclose(probabilities, 1 / 3, atol=1e-6)


def test_input_shape_and_overrides():
    model = keras_vit.ViT_Ti16(input_shape=(32, 48, 1), include_top=False, pooling="token", num_layers=1, dropout_rate=0.1)
    assert model.input.shape == (None, 32, 48, 1)
    assert model.get_layer("encoderblock_0").dropout_rate == 0.1
    assert keras_vit.ViT_B16.__name__ == "ViT_B16" and "hidden size 768" in keras_vit.ViT_B16.__doc__


def test_stochastic_depth_grows_linearly_with_depth():
    model = keras_vit.vision_transformer(**{**TINY, "num_layers": 5}, stochastic_depth_rate=0.2)
    rates = [model.get_layer(f"encoderblock_{i}").stochastic_depth_rate for i in range(5)]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize(
    "kwargs, name, value",
    [
        (dict(image_size=230), "image_size", (230, 230)),
        (dict(image_size=(224, 200)), "image_size", (224, 200)),
        (dict(classifier="unpooled"), "classifier", "unpooled"),
        (dict(classifier="gap", include_top=False, pooling="token"), "pooling", "token"),
        (dict(include_top=False, representation_size=8), "representation_size", 8),
        (dict(pooling="median", include_top=False), "pooling", "median"),
        (dict(gelu="relu"), "gelu", "relu"),
        (dict(hidden_size=190), "num_heads", 3),
        (dict(image_size=0), "image_size", 0),
    ],
)
def test_bad_arguments_are_errors_naming_the_argument_and_its_value(kwargs, name, value):
    with pytest.raises(keras_vit.arguments.ArgumentError) as error:
        keras_vit.create_model("Ti/16", num_layers=1, **kwargs)
    assert (error.value.name, error.value.value) == (name, value)


def test_an_image_side_off_the_token_stride_is_explained_with_the_sizes_that_fit():
    # the one message-text test of the geometry rule
    with pytest.raises(keras_vit.arguments.ArgumentError) as error:
        keras_vit.create_model("Ti/16", num_layers=1, image_size=230)
    assert str(error.value) == ("Image height 230 (image_size) is not a multiple of the token stride 16 (patch size): "
                                "use 224 or 240, or dynamic_padding=True.")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="ViT-H_14"):
        keras_vit.create_model("ViT-Z_16")


# --- the features API --------------------------------------------------------------------------------------------


def _block_params(arrays, i):
    prefix = f"Transformer/encoderblock_{i}/"
    attention = prefix + "MultiHeadDotProductAttention_1/"
    return {
        "ln0_scale": arrays[prefix + "LayerNorm_0/scale"], "ln0_bias": arrays[prefix + "LayerNorm_0/bias"],
        **{f"{part}_kernel": arrays[f"{attention}{part}/kernel"] for part in ("query", "key", "value", "out")},
        **{f"{part}_bias": arrays[f"{attention}{part}/bias"] for part in ("query", "key", "value", "out")},
    }


@pytest.mark.parametrize("name", ["vit_tiny_repr", "vit_tiny_gap", "hybrid_tiny"])
def test_features_reproduce_the_official_intermediates(name):
    from conftest import fixture_path, load_reference, np_attention, np_layer_norm

    ref, config = load_reference(name)
    model = keras_vit.from_official_checkpoint(fixture_path(name, "ckpt"))
    assert isinstance(model, keras_vit.VisionTransformer)
    features = model.features(ref["images"], blocks=True, attention=True)
    n = keras.ops.convert_to_numpy
    atol = 3e-4 if name == "hybrid_tiny" else 1e-5  # the tolerances of test_resnet / test_checkpoints
    np.testing.assert_allclose(n(features["tokens"]), ref["encoded"], atol=atol)
    np.testing.assert_allclose(n(features["pre_logits"]), ref["pre_logits"], atol=atol)
    for i, block in enumerate(features["blocks"]):
        np.testing.assert_allclose(n(block), ref[f"encoderblock_{i}_out"], atol=atol)
    arrays = np.load(fixture_path(name, "ckpt"))
    inputs = [ref["tokens_with_posemb"], ref["encoderblock_0_out"]]
    for i, attention in enumerate(features["attention"]):
        p = _block_params(arrays, i)
        x = np_layer_norm(inputs[i].astype(np.float64), p["ln0_scale"], p["ln0_bias"])
        np.testing.assert_allclose(n(attention), np_attention(x, p)[1], atol=atol)
    grid = ref["patch_embedding"].shape[1:3]
    assert model.grid == grid and model.num_prefix_tokens == int(config["classifier"] == "token")
    assert features["tokens"].shape[1] == model.num_prefix_tokens + grid[0] * grid[1]


def test_features_of_a_headless_model_pool_the_tokens():
    model = keras_vit.vision_transformer(**TINY, include_top=False)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    features = model.features(images)
    n = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(n(features["pre_logits"]), n(features["tokens"])[:, 0])
    assert set(features) == {"pre_logits", "tokens"}
    assert model.feature_model("pre_logits").output.shape == (None, 12)


def _legacy_file(model, path):
    """A .keras file as keras_vit wrote it before VisionTransformer: a plain functional model of the same layers."""
    keras.Model(model.inputs, model.outputs, name=model.name).save(path)


def test_keras_files_saved_before_vision_transformer_still_load(tmp_path):
    from conftest import fixture_path, load_reference

    ref, _ = load_reference("vit_tiny_token")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    _legacy_file(model, tmp_path / "old.keras")
    old = keras.models.load_model(tmp_path / "old.keras")
    assert not isinstance(old, keras_vit.VisionTransformer)
    np.testing.assert_allclose(old.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    with pytest.raises(TypeError, match=r"from_official_checkpoint\('old.keras'\).save\('new.keras'\)"):
        keras_vit.attention_maps(old, ref["images"])
    converted = keras_vit.from_official_checkpoint(tmp_path / "old.keras")
    assert isinstance(converted, keras_vit.VisionTransformer)
    np.testing.assert_allclose(converted.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    assert keras_vit.resize_model(old, 48).grid == (12, 12)


# --- keras.applications conventions (cases adapted from keras' applications_test.py) ---------------------------

APPLICATIONS = {"plain": keras_vit.ViT_Ti16, "hybrid": keras_vit.R_ViT_Ti16}
SMALL = dict(num_layers=1)


@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_notop_custom_input_shape(app):
    model = app(weights=None, include_top=False, input_shape=(64, 96, 3), **SMALL)
    stride = model.token_stride  # 16 plain, 32 hybrid
    assert model.output.shape == (None, 1 + (64 // stride[0]) * (96 // stride[1]), 192)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_variable_input_channels(app, channels):
    model = app(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, channels), **SMALL)
    assert model.input.shape == (None, 32, 32, channels) and model.output.shape == (None, 192)
    assert model.predict(np.zeros((1, 32, 32, channels), "float32"), verbose=0).shape == (1, 192)


@pytest.mark.parametrize("pooling", ["avg", "max", "token", "gap"])
@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_pooling(app, pooling):
    model = app(weights=None, include_top=False, pooling=pooling, image_size=32, **SMALL)
    assert model.output.shape == (None, 192)


def test_max_pooling_is_the_channel_maximum_of_the_patch_tokens():
    tokens_model = keras_vit.vision_transformer(**TINY, include_top=False)
    pooled = keras_vit.vision_transformer(**TINY, include_top=False, pooling="max")
    pooled.set_weights(tokens_model.get_weights())
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    tokens = keras.ops.convert_to_numpy(tokens_model(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pooled(images)), tokens[:, 1:].max(1), atol=1e-6)


@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_input_tensor(app):
    x = keras.Input((32, 32, 3))
    model = app(weights=None, include_top=False, input_tensor=x, pooling="avg", **SMALL)
    assert model.inputs[0] is x and model.output.shape == (None, 192)
    assert isinstance(model, keras_vit.VisionTransformer) and model.grid == (32 // model.token_stride[0],) * 2
    scaled = keras.layers.Rescaling(2.0)(x)  # a tensor computed by other layers: wrapped
    wrapped = app(weights=None, include_top=False, input_tensor=scaled, pooling="avg", name="vit", **SMALL)
    assert wrapped.inputs[0] is x and isinstance(wrapped.get_layer("vit"), keras_vit.VisionTransformer)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        wrapped.predict(images, verbose=0), wrapped.get_layer("vit").predict(2 * images, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_classifier_activation_and_name(app):
    model = app(weights=None, classes=3, classifier_activation="softmax", image_size=32, name="custom", **SMALL)
    assert model.name == "custom"
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("app", APPLICATIONS.values(), ids=APPLICATIONS.keys())
def test_application_serialization_round_trip(app, tmp_path):
    model = app(weights=None, classes=4, image_size=32, include_preprocessing=True, **SMALL)
    for variable in model.weights:  # non-zero head, so the comparison means something
        variable.assign(np.random.default_rng(0).normal(0, 0.1, variable.shape).astype(variable.dtype))
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(reloaded) is keras_vit.VisionTransformer and reloaded.get_config() == model.get_config()
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(reloaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0))


def test_include_preprocessing_maps_pixels_as_preprocess_input():
    raw = keras_vit.ViT_Ti16(weights=None, image_size=32, include_preprocessing=True, **SMALL)
    plain = keras_vit.ViT_Ti16(weights=None, image_size=32, **SMALL)
    for variable in plain.weights:
        variable.assign(np.random.default_rng(0).normal(0, 0.1, variable.shape).astype(variable.dtype))
    raw.set_weights(plain.get_weights())
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    expected = plain.predict(keras.ops.convert_to_numpy(keras_vit.preprocess_input(pixels)), verbose=0)
    np.testing.assert_allclose(raw.predict(pixels, verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 32, 32), (2, 32, 32, 3, 1)])
def test_a_wrong_input_is_a_one_line_error_naming_the_expected_input(shape):
    model = keras_vit.ViT_Ti16(weights=None, image_size=32, name="vit", **SMALL)
    with pytest.raises(ValueError) as error:
        model.predict(np.zeros(shape, "float32"), verbose=0)
    # args[0]: the message itself (JAX appends a traceback note to str(error)).
    assert error.value.args[0] == f"vit expects images shaped (batch, 32, 32, 3), got {shape}."


def test_constructors_share_one_documented_signature():
    import inspect

    signature = inspect.signature(keras_vit.ViT_B16)
    assert list(signature.parameters)[:10] == [
        "include_top", "weights", "input_tensor", "input_shape", "pooling", "classes", "classifier_activation",
        "include_preprocessing", "name", "image_size",
    ]
    for function in CONSTRUCTORS.values():
        assert inspect.signature(function) == signature and "input_tensor" in function.__doc__
