"""Hybrid ResNet + ViT: layers against NumPy, the official hybrid fixture, counts, errors."""

import gc

import keras
import numpy as np
import pytest

import keras_vit
from conftest import fixture_path, load_reference
from keras_vit import configs
from keras_vit.pretrained import config as pconfig
from keras_vit.pretrained import npz
from keras_vit.resnet import BottleneckUnit, ResNetStage, StdConv2D

n = keras.ops.convert_to_numpy
HYBRID_PARAMETER_COUNTS = {  # 224 px, 1000 classes (official models_test.py)
    "R+ViT-Ti_16": (keras_vit.R_ViT_Ti16, 6_337_704),
    "R26+ViT-S_32": (keras_vit.R26_ViT_S32, 36_431_912),
    "R26+ViT-B_32": (keras_vit.R26_ViT_B32, 101_383_976),
    "R50+ViT-B_16": (keras_vit.R50_ViT_B16, 98_659_112),
    "R50+ViT-L_32": (keras_vit.R50_ViT_L32, 328_994_856),
}


def test_std_conv_standardizes_the_kernel_at_every_call():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 9, 3)).astype("float32")
    conv = StdConv2D(4, 3, strides=2)
    conv.build(x.shape)
    kernel = rng.normal(loc=0.3, scale=2.0, size=(3, 3, 3, 4)).astype("float32")
    conv.kernel.assign(kernel)
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    standardized = (kernel - mean) / (kernel.std(axis=(0, 1, 2), keepdims=True) + 1e-5)  # population std + eps
    plain = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)
    plain.build(x.shape)
    plain.kernel.assign(standardized)
    np.testing.assert_allclose(n(conv(x)), n(plain(x)), atol=1e-5)
    np.testing.assert_array_equal(n(conv.kernel), kernel)  # the stored kernel stays raw
    assert conv.bias is None


def _intermediates(model):
    names = {"logits": None, "resnet_root_conv": "conv_root", "resnet_root_gn": "gn_root", "resnet_block1_out": "block1",
             "resnet_block2_out": "block2", "tokens_with_posemb": "posembed_input", "encoded": "encoder_norm"}
    outputs = {key: model.output if layer is None else model.get_layer(layer).output for key, layer in names.items()}
    return keras.Model(model.input, outputs)


def test_hybrid_fixture_reproduced():
    ref, config = load_reference("hybrid_tiny")
    model = keras_vit.vision_transformer(
        image_size=32, patch_size=1, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, classes=10,
        resnet_layers=tuple(config["resnet"]["num_layers"]), resnet_width_factor=config["resnet"]["width_factor"],
    )
    keras_vit.load_weights(model, fixture_path("hybrid_tiny", "ckpt"), adapt=False)
    outputs = _intermediates(model).predict(ref["images"], verbose=0)
    np.testing.assert_allclose(outputs["logits"], ref["logits"], atol=1e-4, rtol=0)
    for key in ("resnet_root_conv", "resnet_root_gn", "resnet_block1_out", "resnet_block2_out", "tokens_with_posemb", "encoded"):
        np.testing.assert_allclose(outputs[key], ref[key], atol=3e-4, rtol=0, err_msg=key)
    features = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"), include_top=False, pooling="token")
    np.testing.assert_allclose(features.predict(ref["images"], verbose=0), ref["pre_logits"], atol=1e-4, rtol=0)


def test_from_official_checkpoint_infers_the_resnet():
    ref, _ = load_reference("hybrid_tiny")
    config = pconfig.infer_config(npz.read_npz(fixture_path("hybrid_tiny", "ckpt")))
    assert config["resnet_layers"] == (2, 2) and config["resnet_width_factor"] == 0.5 and config["image_size"] == (32, 32)
    model = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"))
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-4)
    at64 = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"), image_size=64)
    posemb = n(at64.get_layer("posembed_input").pos_embedding)
    expected = keras_vit.interpolate_posemb(n(model.get_layer("posembed_input").pos_embedding), (8, 8))
    np.testing.assert_allclose(posemb, expected, atol=1e-7)  # the grid is the feature-map grid


def test_stage_count_mismatch_is_a_clear_error():
    model = keras_vit.vision_transformer(
        image_size=32, patch_size=1, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, classes=10,
        resnet_layers=(2,), resnet_width_factor=0.5,
    )
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"Not used by the model \(\d+\): block2/unit1/conv1/kernel"):
        keras_vit.load_weights(model, fixture_path("hybrid_tiny", "ckpt"), adapt=False)


@pytest.mark.parametrize("name", HYBRID_PARAMETER_COUNTS)
def test_hybrid_parameter_counts(name):
    constructor, count = HYBRID_PARAMETER_COUNTS[name]
    model = constructor()
    assert model.count_params() == count
    assert keras_vit.create_model(name, num_layers=1).get_layer("embedding").patch_size == (configs.model_config(name)["patch_size"],) * 2
    del model
    gc.collect()


def test_feature_maps_are_named_layers_and_the_root_alone_has_stride_4():
    model = keras_vit.R50_ViT_B16(num_layers=1, include_top=False)
    assert [model.get_layer(f"block{i}").output.shape for i in (1, 2, 3)] == [
        (None, 56, 56, 256), (None, 28, 28, 512), (None, 14, 14, 1024)]
    stem = keras_vit.create_model("R+ViT-Ti_16", num_layers=1, include_top=False)
    assert stem.get_layer("root_pool").output.shape == (None, 56, 56, 64)
    assert stem.output.shape == (None, 1 + 7 * 7, 192)


def test_hybrid_names():
    assert configs.model_config("R50+B/16")["resnet_layers"] == (3, 4, 9)
    assert configs.model_config("R50+ViT-L_32")["resnet_layers"] == (3, 4, 6, 3)
    assert "R50+ViT-B_16" in keras_vit.list_models()
    with pytest.raises(ValueError, match="not a released hybrid configuration"):
        configs.model_config("R50+ViT-S_16")


@pytest.mark.parametrize(
    "layer",
    [StdConv2D(8, 3, strides=2, name="conv_root"), BottleneckUnit(16, strides=2, name="unit1"), ResNetStage(2, 8, first_stride=2, name="block2")],
    ids=lambda layer: type(layer).__name__,
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


def test_hybrid_keras_file_and_mixed_precision(tmp_path):
    ref, _ = load_reference("hybrid_tiny")
    model = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"))
    model.save(tmp_path / "hybrid.keras")
    reloaded = keras.models.load_model(tmp_path / "hybrid.keras")
    np.testing.assert_allclose(reloaded.predict(ref["images"], verbose=0), ref["logits"], atol=1e-4)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"))
        assert mixed.get_layer("block1").compute_dtype == "bfloat16"
        logits = mixed.predict(ref["images"], verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref["logits"], atol=0.1)  # bfloat16 round-off (observed 0.05)
