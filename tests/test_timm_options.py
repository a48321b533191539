"""The block options of timm's checkpoints (issue 35), each declared once as a builder argument.

Every shared timm fixture is built from its folder alone and gives timm's outputs on the backend of the test run
(CI runs this file on TensorFlow, JAX and PyTorch), also at another image size with timm's resampling of the
position embeddings. Each option is checked against a NumPy reference of its formula (``official_forward``,
written from the official and timm semantics in tests/test_timm.py), through ``features()`` and the attention
maps, a ``.keras`` round trip, a model of any size, and Keras' quantization and LoRA.
"""

import numpy as np
import pytest
from conftest import TIMM_FIXTURES, np_softmax, timm_reference
from safetensors.numpy import load_file
from test_timm import MANIFEST, NAMES, _facts, official_forward, timm_forward

import keras
import keras_vit
from keras_vit.official_names import official_arrays
from keras_vit.pretrained.resample import interpolate_posemb, resample_posemb_antialiased


def n(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


# --- every fixture from its folder alone, at its size and at another ---

@pytest.mark.parametrize("name", NAMES)
def test_every_timm_fixture_from_its_folder(name):
    ref = timm_reference(name)
    model = keras_vit.from_official_checkpoint(TIMM_FIXTURES / name)
    features = model.features(ref["images"])
    key = "logits" if "logits" in ref else "pre_logits"
    np.testing.assert_allclose(n(model(ref["images"])), ref[key], atol=1e-5, rtol=0)
    np.testing.assert_allclose(n(features["pre_logits"]), ref["pre_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(n(features["tokens"]), ref["tokens"], atol=1e-4, rtol=0)


def _timm_at(name, size):
    """timm's outputs at ``size`` px in NumPy: its forward with pos_embed resampled as timm's checkpoint filter does
    (``resample_abs_pos_embed``: PyTorch's antialiased bicubic, checked against torch in test_timm.py)."""
    manifest, facts = MANIFEST[name], _facts(name)
    state = load_file(TIMM_FIXTURES / name / "model.safetensors")
    patch = state["patch_embed.proj.weight"].shape[-1]
    prefix = 0 if facts["no_embed_class"] else manifest["num_prefix_tokens"]
    old = manifest["model_args"]["img_size"] // patch
    state["pos_embed"] = resample_posemb_antialiased(state["pos_embed"], (size // patch,) * 2, prefix, (old, old))
    images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype("float32")
    return images, timm_forward(state, images, manifest["model_args"]["num_heads"], facts, manifest["global_pool"],
                                manifest["num_prefix_tokens"])


@pytest.mark.parametrize("name", ["vit_augreg_like", "vit_dinov2_like", "vit_reg4_gap_like"])
def test_a_timm_fixture_at_another_size_resamples_as_timm(name):
    patch = load_file(TIMM_FIXTURES / name / "model.safetensors")["patch_embed.proj.weight"].shape[-1]
    size = MANIFEST[name]["model_args"]["img_size"] + 2 * patch
    images, expected = _timm_at(name, size)
    key = "logits" if "logits" in expected else "pre_logits"
    resized = keras_vit.from_official_checkpoint(TIMM_FIXTURES / name, image_size=size)
    assert resized.architecture.posemb_interpolation == "bicubic"
    np.testing.assert_allclose(n(resized(images)), expected[key], atol=1e-5, rtol=0)
    np.testing.assert_allclose(n(resized.features(images)["tokens"]), expected["tokens"], atol=1e-4, rtol=0)
    any_size = keras_vit.from_official_checkpoint(TIMM_FIXTURES / name, input_shape=(None, None, 3))
    np.testing.assert_allclose(n(any_size(images)), expected[key], atol=1e-5, rtol=0)  # resampled in the graph


# --- each option against its NumPy formula ---

TINY = dict(image_size=32, patch_size=8, hidden_size=24, num_layers=2, num_heads=3, mlp_dim=48, classes=5)
OPTION_SETS = {  # one model per set; together they take every option and value
    "clip": dict(pre_norm=True, gelu="quick", layer_norm_epsilon=1e-5),
    "dinov2_reg": dict(layer_scale=0.1, num_register_tokens=2, posemb_class_token=False),
    "options": dict(qkv_bias=False, qk_norm=True, gelu="tanh", layer_scale=0.5),
    "reg_gap_fc_norm": dict(classifier="gap", num_register_tokens=4, fc_norm=True, gelu="erf"),
    "map_qk_norm": dict(classifier="map", qk_norm=True, layer_norm_epsilon=1e-5, posemb_interpolation="bicubic"),
}


def _reference_arguments(model):
    """``official_forward``'s arguments: the builder's, as resolved by the model."""
    arch = model.architecture
    return dict(model.vit_config, posemb_class_token=arch.posemb_prefix_rows > 0,
                include_top=arch.classes is not None, pooling=arch.pooling, classifier=arch.pooling)


def _randomized(model, seed=0):
    """Every weight drawn anew (norm scales and LayerScale near 1 and 0.5) so that each part matters."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shift = 1.0 if weight.path.endswith(("gamma", "scale")) else 0.0
        weight.assign(shift + 0.2 * rng.normal(size=weight.shape).astype("float32"))
    return model


def _np_attention(arrays, x, scope, args):
    """Attention weights (B, N, T, T) of one block in NumPy (qk_norm and no q/k bias included)."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    ln = lambda y, s: (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + args["layer_norm_epsilon"]) * a[f"{s}/scale"] + a[f"{s}/bias"]  # noqa: E731
    y = ln(x, f"{scope}/LayerNorm_0")
    att = f"{scope}/MultiHeadDotProductAttention_1"
    q, k = (np.einsum("btd,dnh->bnth", y, a[f"{att}/{p}/kernel"]) + a.get(f"{att}/{p}/bias", 0)[..., None, :]
            if f"{att}/{p}/bias" in a else np.einsum("btd,dnh->bnth", y, a[f"{att}/{p}/kernel"]) for p in ("query", "key"))
    if args["qk_norm"]:
        q, k = ln(q, f"{att}/query_ln"), ln(k, f"{att}/key_ln")
    return np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))


@pytest.mark.parametrize("options", OPTION_SETS)
def test_each_option_is_its_formula(options):
    """Logits, pooled vector, tokens and attention maps against the NumPy formula of every option."""
    model = _randomized(keras_vit.vision_transformer(**TINY, **OPTION_SETS[options]))
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    arrays, args = official_arrays(model), _reference_arguments(model)
    expected = official_forward(arrays, images, args)
    features = model.features(images, blocks=True, attention=True)
    np.testing.assert_allclose(n(model(images)), expected["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(n(features["pre_logits"]), expected["pre_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(n(features["tokens"]), expected["tokens"], atol=1e-4, rtol=0)
    attention = _np_attention(arrays, n(features["blocks"][0]), "Transformer/encoderblock_1", args)
    np.testing.assert_allclose(n(features["attention"][1]), attention, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTION_SETS)
def test_each_option_survives_keras_machinery(options, tmp_path):
    """A .keras round trip, a model of any size, LoRA and int8 quantization, on a model of each option set."""
    model = _randomized(keras_vit.vision_transformer(**TINY, **OPTION_SETS[options]))
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    arrays, args = official_arrays(model), _reference_arguments(model)
    expected = official_forward(arrays, images, args)

    # .keras round trip: the same model (config and outputs), loaded in Keras' safe mode
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.vit_config == model.vit_config
    np.testing.assert_allclose(n(loaded(images)), expected["logits"], atol=1e-5, rtol=0)

    # any size: the same weights in a model of open sides, at the native size and at another
    any_size = keras_vit.vision_transformer(**dict(model.vit_config, image_size=(None, None), native_image_size=(32, 32)))
    any_size.set_weights(model.get_weights())
    np.testing.assert_allclose(n(any_size(images)), expected["logits"], atol=1e-5, rtol=0)
    bigger = np.random.default_rng(3).normal(size=(2, 48, 48, 3)).astype("float32")
    posemb = "Transformer/posembed_input/pos_embedding"
    resample = resample_posemb_antialiased if args["posemb_interpolation"] == "bicubic" else interpolate_posemb
    resampled = dict(arrays, **{posemb: resample(arrays[posemb], (6, 6), model.architecture.posemb_prefix_rows, (4, 4))})
    np.testing.assert_allclose(n(any_size(bigger)), official_forward(resampled, bigger, args)["logits"], atol=1e-5, rtol=0)

    # Keras' quantization and LoRA reach the option's layers (projections without bias, next to q/k norms)
    lora = keras_vit.vision_transformer(**model.vit_config)
    lora.set_weights(model.get_weights())
    lora.enable_lora(2)
    block = lora.get_layer("encoderblock_0").attention
    assert block.query.lora_enabled and block.value.lora_enabled
    np.testing.assert_allclose(n(lora(images)), expected["logits"], atol=1e-5, rtol=0)  # B = 0: unchanged at start
    model.quantize("int8")
    block = model.get_layer("encoderblock_0").attention
    assert block.query.quantization_mode == "int8" and (block.query.bias is None) == (not args["qkv_bias"])
    assert np.abs(n(model(images)) - expected["logits"]).max() < 0.1 * np.abs(expected["logits"]).max()


def test_load_weights_refuses_a_file_that_computes_otherwise():
    """A timm file states its GELU form and norm epsilon; a model built with others is refused, not fed."""
    from keras_vit.errors import CheckpointMismatchError
    from keras_vit.pretrained.timm import read_timm

    arguments = read_timm(TIMM_FIXTURES / "vit_clip_like").arguments
    model = keras_vit.vision_transformer(**dict(arguments, gelu="tanh"))
    with pytest.raises(CheckpointMismatchError) as refused:
        keras_vit.load_weights(model, TIMM_FIXTURES / "vit_clip_like")
    assert "gelu='erf'" in refused.value.summary and "layer_norm_epsilon" not in refused.value.summary
    keras_vit.load_weights(keras_vit.vision_transformer(**arguments), TIMM_FIXTURES / "vit_clip_like")
