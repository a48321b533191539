"""big_vision's ViT options against its own outputs (../shared/fixtures/big_vision_vit): the MAP head, 2-D sin-cos
position embeddings, a class token without a position embedding, global average pooling."""

import numpy as np
import pytest
import keras

import keras_vit
from conftest import big_vision_path, big_vision_reference
from keras_vit.pretrained import npz

LOOP_FIXTURES = ("bv_map", "bv_tok", "bv_gap_sincos")
_CLASSIFIER = {"map": "map", "tok": "token", "gap": "gap"}


def builder_arguments(config, image_shape):
    """``VisionTransformer`` arguments of a big_vision ``vit.Model`` config (explicit, nothing inferred)."""
    return dict(
        image_size=tuple(image_shape[1:3]),
        patch_size=tuple(config["patch_size"]),
        hidden_size=config["width"],
        num_layers=config["depth"],
        num_heads=config["num_heads"],
        mlp_dim=config["mlp_dim"],
        classifier=_CLASSIFIER[config["pool_type"]],
        posemb=config["posemb"],
        posemb_class_token=False,  # big_vision adds the position embeddings before the class token
        representation_size=config.get("rep_size") or None,
        classes=config["num_classes"],
    )


@pytest.mark.parametrize("name", LOOP_FIXTURES)
def test_builder_reproduces_big_vision_outputs(name):
    ref, config = big_vision_reference(name)
    model = keras_vit.vision_transformer(**builder_arguments(config, ref["images"].shape))
    keras_vit.load_weights(model, big_vision_path(name, "ckpt"), adapt=False)
    out = model.features(ref["images"], blocks=True)
    n = keras.ops.convert_to_numpy
    np.testing.assert_allclose(n(model(ref["images"])), ref["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(n(out["tokens"]), ref["out/encoded"], atol=5e-5)
    np.testing.assert_allclose(n(out["pre_logits"]), ref["out/pre_logits"], atol=5e-5)
    for i, block in enumerate(out["blocks"]):
        np.testing.assert_allclose(n(block), ref[f"out/encoder/block{i:02d}/plus_mlp"], atol=5e-5)


def test_map_head_intermediates_match_big_vision():
    ref, config = big_vision_reference("bv_map")
    model = keras_vit.vision_transformer(**builder_arguments(config, ref["images"].shape))
    keras_vit.load_weights(model, big_vision_path("bv_map", "ckpt"), adapt=False)
    head = model.get_layer("pool")
    tokens = model.features(ref["images"])["tokens"]
    n = keras.ops.convert_to_numpy
    attended = head.attention(head._probe(tokens), tokens)
    np.testing.assert_allclose(n(attended), ref["map/attn_out"], atol=5e-5)
    np.testing.assert_allclose(n(head.norm(attended)), ref["map/ln_out"], atol=5e-5)


def test_sincos_model_has_no_position_embedding_weights():
    ref, config = big_vision_reference("bv_gap_sincos")
    model = keras_vit.vision_transformer(**builder_arguments(config, ref["images"].shape))
    assert not any("pos_embedding" in name for name in model.official_weights())
    arrays = npz.read_npz(big_vision_path("bv_gap_sincos", "ckpt"))
    assert "pos_embedding" not in arrays
