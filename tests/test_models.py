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
}
CONSTRUCTORS = {
    "ViT-Ti_16": keras_vit.ViT_Ti16, "ViT-S_16": keras_vit.ViT_S16, "ViT-S_32": keras_vit.ViT_S32,
    "ViT-B_8": keras_vit.ViT_B8, "ViT-B_16": keras_vit.ViT_B16, "ViT-B_32": keras_vit.ViT_B32,
    "ViT-L_16": keras_vit.ViT_L16, "ViT-L_32": keras_vit.ViT_L32, "ViT-H_14": keras_vit.ViT_H14,
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
    query = n(block.attention.query_kernel)
    assert np.abs(query).max() <= limit and np.abs(query).max() > 0.9 * limit
    mlp_limit = np.sqrt(6 / (96 + 384))
    assert np.abs(n(block.mlp_in.kernel)).max() <= mlp_limit
    assert 0 < np.abs(n(block.mlp_in.bias)).max() < 1e-5  # normal(std 1e-6)
    patch = n(model.get_layer("embedding").kernel)  # lecun normal: std sqrt(1 / fan_in), truncated
    assert abs(patch.std() - np.sqrt(1 / (4 * 4 * 3))) < 0.02
    logits = model(np.zeros((2, 32, 32, 3), "float32"))
    assert not n(logits).any()  # zero-initialised head


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
    assert keras_vit.ViT_B16.__name__ == "ViT_B16" and "768" in keras_vit.ViT_B16.__doc__


def test_stochastic_depth_grows_linearly_with_depth():
    model = keras_vit.vision_transformer(**{**TINY, "num_layers": 5}, stochastic_depth_rate=0.2)
    rates = [model.get_layer(f"encoderblock_{i}").stochastic_depth_rate for i in range(5)]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=230), "Image height 230 is not divisible by the patch height 16"),
        (dict(image_size=(224, 200)), "Image width 200 is not divisible by the patch width 16"),
        (dict(classifier="unpooled"), "include_top=False"),
        (dict(classifier="gap", include_top=False, pooling="token"), "needs a class token"),
        (dict(include_top=False, representation_size=8), "pooling="),
        (dict(pooling="max", include_top=False), "pooling must be one of"),
        (dict(gelu="relu"), "gelu must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_vit.create_model("Ti/16", num_layers=1, **kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="ViT-H_14"):
        keras_vit.create_model("ViT-Z_16")
