"""The architecture options (MAP head, register tokens, 2-D sin-cos position embeddings, big_vision's class token),
``Architecture`` as the one description, and arguments checked with errors that name them."""

import json

import keras
import numpy as np
import pytest

import keras_vit
from conftest import fixture_path
from keras_vit.architecture import Architecture

SMALL = dict(image_size=16, patch_size=4, hidden_size=12, num_layers=2, num_heads=3, mlp_dim=24, classes=5)
OPTIONS = {
    "map": dict(classifier="map"),
    "map_pooling": dict(include_top=False, pooling="map"),
    "registers": dict(num_register_tokens=3),
    "registers_gap": dict(classifier="gap", num_register_tokens=2),
    "sincos": dict(classifier="gap", posemb="sincos2d"),
    "big_vision_token": dict(posemb_class_token=False),
}


def _random(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "float" in str(variable.dtype):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model


def _images(count=2, size=16):
    return np.random.default_rng(1).uniform(-1, 1, (count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("option", OPTIONS)
def test_option_builds_saves_and_reloads_with_identical_outputs(option, tmp_path):
    model = _random(keras_vit.vision_transformer(**SMALL, **OPTIONS[option]))
    images = _images()
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(images)), keras.ops.convert_to_numpy(model(images)))
    assert reloaded.architecture == model.architecture


@pytest.mark.parametrize("option", OPTIONS)
def test_option_through_create_model_and_constructors(option):
    config = {k: v for k, v in OPTIONS[option].items()}
    model = keras_vit.ViT_Ti16(image_size=32, num_layers=1, classes=3, **config)
    named = keras_vit.create_model("Ti/16", image_size=32, num_layers=1, classes=3, **config)
    assert model.architecture == named.architecture
    features = model.features(_images(size=32), attention=True)
    tokens = model.architecture.num_tokens
    assert features["tokens"].shape == (2, tokens, 192)
    assert features["attention"][0].shape == (2, 3, tokens, tokens)
    maps = keras_vit.attention_rollout(model, _images(size=32))
    assert maps["grid"].shape == (2, 2, 2)  # registers and the class token are not part of the grid


def _token_layout(model, images):
    """The tokens entering the first block (dropout is off in inference)."""
    probe = keras.Model(model.inputs[0], model.get_layer("dropout").output)
    return keras.ops.convert_to_numpy(probe(images))


@pytest.mark.parametrize("posemb_class_token", [True, False])
def test_token_layout_class_token_registers_then_the_grid(posemb_class_token):
    model = _random(keras_vit.vision_transformer(**SMALL, num_register_tokens=2, posemb_class_token=posemb_class_token))
    images = _images()
    n = keras.ops.convert_to_numpy
    kernel, bias = n(model.get_layer("embedding").kernel), n(model.get_layer("embedding").bias)
    patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, -1) @ kernel.reshape(-1, 12) + bias
    cls, registers = n(model.get_layer("cls").cls)[0], n(model.get_layer("reg").registers)[0]
    posemb = n(model.get_layer("posembed_input").pos_embedding)[0]
    if posemb_class_token:  # the 2020 layout: the class token has the first row
        assert posemb.shape == (17, 12)
        cls, grid_posemb = cls + posemb[:1], posemb[1:]
    else:  # big_vision: the table covers the grid, added before the class token
        assert posemb.shape == (16, 12)
        grid_posemb = posemb
    expected = np.concatenate([np.broadcast_to(cls, (2, 1, 12)), np.broadcast_to(registers, (2, 2, 12)),
                               patches + grid_posemb], axis=1)
    np.testing.assert_allclose(_token_layout(model, images), expected, atol=1e-5)
    assert model.num_prefix_tokens == 3


def test_sincos_model_adds_the_computed_table_and_stores_nothing():
    from test_layers import _np_sincos

    model = _random(keras_vit.vision_transformer(**{**SMALL, "image_size": (16, 24)}, classifier="gap", posemb="sincos2d"))
    images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 24, 3)).astype("float32")
    n = keras.ops.convert_to_numpy
    kernel, bias = n(model.get_layer("embedding").kernel), n(model.get_layer("embedding").bias)
    patches = images.reshape(2, 4, 4, 6, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 24, -1) @ kernel.reshape(-1, 12) + bias
    np.testing.assert_allclose(_token_layout(model, images), patches + _np_sincos(4, 6, 12), atol=1e-5)
    assert not any("pos" in name for name in model.official_weights())
    np.testing.assert_allclose(model.position_embeddings(), _np_sincos(4, 6, 12)[0], atol=1e-6)


def test_pooling_map_on_a_headless_token_model_attends_to_the_grid_only():
    model = keras_vit.vision_transformer(**SMALL, include_top=False, pooling="map", num_register_tokens=1)
    assert model.output.shape == (None, 12)
    assert model.get_layer("pool").num_prefix_tokens == 2
    out = model.features(_images(), attention=True)
    assert out["pooling_attention"].shape == (2, 3, 1, 16)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["pooling_attention"]).sum(-1), 1.0, atol=1e-5)


def test_official_names_of_the_new_parts():
    names = set(keras_vit.vision_transformer(**SMALL, classifier="map", num_register_tokens=2).official_weights())
    assert {"reg", "MAPHead_0/probe", "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel",
            "MAPHead_0/MlpBlock_0/Dense_1/bias", "Transformer/posembed_input/pos_embedding"} <= names
    assert "cls" not in names


# --- Architecture: one description ---------------------------------------------------------------------------------


def test_architecture_describes_the_model():
    model = keras_vit.vision_transformer(**SMALL, num_register_tokens=2, representation_size=6)
    arch = model.architecture
    assert arch.prefix_tokens == (("class", 1), ("register", 2))
    assert (arch.num_prefix_tokens, arch.grid, arch.token_stride, arch.num_tokens) == (3, (4, 4), (4, 4), 19)
    assert arch.posemb_shape == (1, 17, 12) and arch.pooling == "token" and arch.classes == 5
    assert Architecture.from_arguments(**{k: v for k, v in model.vit_config.items() if k in ARCHITECTURE_KEYS}) == arch
    hybrid = keras_vit.create_model("R50+B/16", num_layers=1).architecture
    assert hybrid.token_stride == (16, 16) and hybrid.grid == (14, 14)


ARCHITECTURE_KEYS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier",
                     "representation_size", "include_top", "classes", "pooling", "num_register_tokens", "posemb",
                     "posemb_class_token", "gelu", "channels", "resnet_layers", "resnet_width_factor")


def test_from_official_checkpoint_infers_the_new_options(tmp_path):
    from keras_vit.official_names import official_arrays

    for option in ("map", "registers", "sincos", "big_vision_token"):
        model = _random(keras_vit.vision_transformer(**SMALL, **OPTIONS[option]))
        np.savez(tmp_path / f"{option}.npz", **official_arrays(model))
        loaded = keras_vit.from_official_checkpoint(tmp_path / f"{option}.npz", image_size=16)
        assert loaded.architecture == model.architecture, option
        np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(_images())),
                                   keras.ops.convert_to_numpy(model(_images())), atol=1e-6)


# --- arguments: every one checked, naming itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: keras_vit.create_model("Ti/16", hiden_size=48), TypeError, ["hiden_size", "hidden_size"]),
        (lambda: keras_vit.create_model("Ti/16", num_layer=1), TypeError, ["num_layer", "num_layers"]),
        (lambda: keras_vit.ViT_Ti16(foo=1), TypeError, ["foo"]),
        (lambda: keras_vit.vision_transformer(**SMALL, dropout_rat=0.5), TypeError, ["dropout_rat", "dropout_rate"]),
        (lambda: keras_vit.create_model("Ti/16", image_size=8), ValueError, ["height 8", "16"]),
        (lambda: keras_vit.create_model("Ti/16", classes=0), ValueError, ["classes", "0"]),
        (lambda: keras_vit.create_model("Ti/16", patch_size=0), ValueError, ["patch_size", "0"]),
        (lambda: keras_vit.create_model("Ti/16", image_size=224.0), ValueError, ["image_size", "224.0"]),
        (lambda: keras_vit.create_model("Ti/16", dropout_rate=1.0), ValueError, ["dropout_rate", "1.0"]),
        (lambda: keras_vit.create_model("Ti/16", image_size=64, input_shape=(32, 32, 3)), ValueError,
         ["image_size=64", "input_shape"]),
        (lambda: keras_vit.create_model("Ti/16", num_register_tokens=-1), ValueError, ["num_register_tokens"]),
        (lambda: keras_vit.create_model("Ti/16", posemb="rope"), ValueError, ["posemb", "rope"]),
        (lambda: keras_vit.vision_transformer(**{**SMALL, "hidden_size": 10, "num_heads": 2}, posemb="sincos2d"),
         ValueError, ["multiple of 4", "10"]),
        (lambda: keras_vit.vision_transformer(**SMALL, class_names=["a", "b"]), ValueError, ["class_names", "5"]),
        (lambda: keras_vit.vision_transformer(**{**SMALL, "classes": 3}, class_names="abc"), ValueError,
         ["class_names", "'abc'"]),
        (lambda: keras_vit.vision_transformer(**SMALL, posemb_class_token="no"), ValueError,
         ["posemb_class_token", "'no'"]),
        (lambda: keras_vit.vision_transformer(**SMALL, dynamic_padding="yes"), ValueError, ["dynamic_padding"]),
        (lambda: keras_vit.vision_transformer(**{**SMALL, "classes": None}), ValueError, ["classes", "None"]),
        (lambda: keras_vit.ViT_Ti16(image_size=32, num_layers=1, classes=0), ValueError, ["classes", "0"]),
        (lambda: keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), classes=0), ValueError,
         ["classes", "0"]),
    ],
)
def test_bad_arguments_name_themselves(call, error, words):
    with pytest.raises(error) as caught:
        call()
    for word in words:
        assert word in str(caught.value)


def test_channels_first_global_setting_builds_channels_last_models():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = keras_vit.create_model("R+Ti/16", image_size=32, num_layers=1, classes=3)
        plain = keras_vit.create_model("Ti/16", image_size=32, num_layers=1, classes=3)
        assert model.input.shape == (None, 32, 32, 3)
        assert plain(_images(size=32)).shape == (2, 3) and model(_images(size=32)).shape == (2, 3)
    finally:
        keras.config.set_image_data_format(previous)


def test_class_names_are_stored_with_the_model(tmp_path):
    model = keras_vit.vision_transformer(**SMALL, class_names=["a", "b", "c", "d", "e"])
    model.save(tmp_path / "named.keras")
    assert keras.models.load_model(tmp_path / "named.keras").class_names == ["a", "b", "c", "d", "e"]
    assert json.loads(json.dumps(model.get_config()))["class_names"] == ["a", "b", "c", "d", "e"]


def test_a_new_pooling_kind_is_one_layer_and_one_registry_line(monkeypatch):
    # What adding a pooling takes: a layer (B, T, D) -> (B, D) and its registry entry; the builder, the
    # argument checks, the head and the features pick it up.
    from keras_vit.layers import heads

    class FirstGridToken(keras.layers.Layer):
        def __init__(self, num_prefix_tokens, **kwargs):
            super().__init__(**kwargs)
            self.num_prefix_tokens = num_prefix_tokens

        def call(self, tokens):
            return tokens[:, self.num_prefix_tokens]

    monkeypatch.setitem(heads.POOLINGS, "first", heads.PoolingKind(
        lambda arch, **kw: FirstGridToken(arch.num_prefix_tokens, **kw), None))
    model = keras_vit.vision_transformer(**SMALL, classifier="first", num_register_tokens=1)
    features = model.features(_images())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(features["pre_logits"]),
                                  keras.ops.convert_to_numpy(features["tokens"])[:, 1])
    headless = keras_vit.vision_transformer(**SMALL, include_top=False, pooling="first")
    assert headless.output.shape == (None, 12)


def test_a_new_position_embedding_kind_is_one_layer_and_one_registry_line(monkeypatch):
    # What adding a position embedding takes: a layer (tokens, pixels) -> tokens and its registry entry; the
    # argument check, the builder, the checkpoint names and the token layout pick it up. Here: none at all, which
    # makes a GAP model blind to where a patch is (swapping two patches leaves the logits unchanged).
    from keras_vit.layers import embedding

    class NoPositions(keras.layers.Layer):
        def call(self, tokens, pixels=None):
            return tokens

    with pytest.raises(keras_vit.arguments.ArgumentError) as error:
        keras_vit.vision_transformer(**SMALL, posemb="none")
    assert error.value.name == "posemb"
    monkeypatch.setitem(embedding.POSEMBS, "none", embedding.PosembKind(
        lambda arch, **kw: NoPositions(**kw), learned=False, check=None))
    model = _random(keras_vit.vision_transformer(**SMALL, classifier="gap", posemb="none"))
    assert model.architecture.posemb_shape is None and model.architecture.posemb_prefix_rows == 0
    assert not any("posembed_input" in name for name in model.official_weights())
    images = _images()
    swapped = images.copy()
    swapped[:, :4, :4], swapped[:, 8:12, 4:8] = images[:, 8:12, 4:8], images[:, :4, :4]
    n = keras.ops.convert_to_numpy
    np.testing.assert_allclose(n(model(swapped)), n(model(images)), atol=1e-5, rtol=0)
    learned = _random(keras_vit.vision_transformer(**SMALL, classifier="gap"))
    assert np.abs(n(learned(swapped)) - n(learned(images))).max() > 1e-3  # a position embedding does see it


def test_a_new_prefix_token_kind_is_one_layer_and_one_registry_line(monkeypatch):
    # What adding a prefix token takes: a layer inserting it and its registry entry with its count; the token
    # count, the layout, the poolings and the checkpoint names pick it up (here a DeiT-style distillation token).
    from keras_vit.layers import tokens

    monkeypatch.setitem(tokens.PREFIX_TOKENS, "dist", tokens.PrefixKind(
        tokens.RegisterTokens, "dist_token", None, lambda arch: 1))
    model = _random(keras_vit.vision_transformer(**SMALL, classifier="gap", num_register_tokens=2))
    assert model.architecture.prefix_tokens == (("register", 2), ("dist", 1))
    assert model.num_prefix_tokens == 3 and "dist_token" in model.official_weights()
    features = model.features(_images())
    n = keras.ops.convert_to_numpy
    assert features["tokens"].shape == (2, 3 + 16, 12)
    np.testing.assert_allclose(n(features["pre_logits"]), n(features["tokens"])[:, 3:].mean(axis=1), atol=1e-5)
    token_model = keras_vit.vision_transformer(**SMALL)
    assert token_model.architecture.prefix_tokens == (("class", 1), ("dist", 1))
