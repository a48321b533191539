"""big_vision's ViTs and SigLIP image towers against big_vision's own outputs (../shared/fixtures/big_vision_vit):
the MAP head, 2-D sin-cos position embeddings, a class token without a position embedding, global average pooling,
the stacked (scan) layout, two-tower files; FlexiViT's patch resize against big_vision's recipe."""

import json

import keras
import numpy as np
import pytest

import keras_vit
from conftest import (
    big_vision_path,
    big_vision_reference,
    flexivit_resize_matrix,
    grow_patches,
    np_attention,
    np_layer_norm,
)
from keras_vit.pretrained import names, npz, registry

FIXTURES = ("bv_map", "bv_map_scan", "bv_tok", "bv_gap_sincos", "siglip_img_like", "siglip2_img_like")
MAP_FIXTURES = ("bv_map", "bv_map_scan", "siglip_img_like", "siglip2_img_like")
_CLASSIFIER = {"map": "map", "tok": "token", "gap": "gap"}
n = keras.ops.convert_to_numpy


def builder_arguments(config, image_shape):
    """``VisionTransformer`` arguments of a big_vision ``vit.Model`` config (explicit, nothing inferred)."""
    classifier = _CLASSIFIER[config["pool_type"]]
    headless = config["num_classes"] is None  # the model returns its pooled representation (pre_logits)
    return dict(
        image_size=tuple(image_shape[1:3]),
        patch_size=tuple(config["patch_size"]),
        hidden_size=config["width"],
        num_layers=config["depth"],
        num_heads=config["num_heads"],
        mlp_dim=config["mlp_dim"],
        classifier=classifier,
        posemb=config["posemb"],
        posemb_class_token=False,  # big_vision adds the position embeddings before the class token
        representation_size=config.get("rep_size") or None,
        include_top=not headless,
        classes=config["num_classes"] or 1000,
        pooling=classifier if headless else None,
    )


def inferred_model(name):
    """From the file alone; fixed sin-cos position embeddings hold no grid, so that file needs the image size."""
    ref, config = big_vision_reference(name)
    extra = {"image_size": ref["images"].shape[1:3]} if config["posemb"] == "sincos2d" else {}
    return keras_vit.from_official_checkpoint(big_vision_path(name, "ckpt"), **extra)


def built_model(name):
    ref, config = big_vision_reference(name)
    model = keras_vit.vision_transformer(**builder_arguments(config, ref["images"].shape))
    return keras_vit.load_weights(model, big_vision_path(name, "ckpt"), adapt=False)


MODELS = {"inferred": inferred_model, "builder": built_model}


def sub_model_output(model, layer_name, images):
    return n(keras.Model(model.inputs[0], model.get_layer(layer_name).output)(images))


@pytest.mark.parametrize("how", MODELS)
@pytest.mark.parametrize("name", FIXTURES)
def test_reproduces_big_vision_outputs(name, how):
    ref, config = big_vision_reference(name)
    model = MODELS[how](name)
    images = ref["images"]
    assert model.architecture == built_model(name).architecture
    np.testing.assert_allclose(n(model(images)), ref["logits"], atol=1e-5, rtol=1e-5)
    out = model.features(images, blocks=True)
    batch, grid, hidden = images.shape[0], model.grid, config["width"]
    stem = n(model.patch_embedding_model()(images))
    np.testing.assert_allclose(stem, ref["out/stem"].reshape(batch, -1, hidden), atol=5e-5)
    np.testing.assert_allclose(sub_model_output(model, "posembed_input", images), ref["out/with_posemb"], atol=5e-5)
    for i, block in enumerate(out["blocks"]):
        np.testing.assert_allclose(n(block), ref[f"out/encoder/block{i:02d}/plus_mlp"], atol=5e-5)
    np.testing.assert_allclose(n(out["tokens"]), ref["out/encoded"], atol=5e-5)
    np.testing.assert_allclose(n(out["pre_logits"]), ref["out/head_input"], atol=5e-5)
    np.testing.assert_allclose(n(out["pre_logits"]), ref["out/pre_logits"], atol=5e-5)
    grid_tokens = n(out["tokens"])[:, model.num_prefix_tokens :]
    np.testing.assert_allclose(grid_tokens.reshape(batch, *grid, hidden), ref["out/pre_logits_2d"], atol=5e-5)
    if "out/logits_2d" in ref:
        np.testing.assert_allclose(n(model.get_layer("head")(grid_tokens)).reshape(ref["out/logits_2d"].shape),
                                   ref["out/logits_2d"], atol=5e-5)
    if "posemb_sincos_2d" in ref:
        np.testing.assert_allclose(model.position_embeddings(), ref["posemb_sincos_2d"][0], atol=1e-6)


def test_inferred_architectures():
    described = {name: inferred_model(name) for name in FIXTURES}
    assert {name: m.vit_config["classifier"] for name, m in described.items()} == {
        "bv_map": "map", "bv_map_scan": "map", "bv_tok": "token", "bv_gap_sincos": "gap",
        "siglip_img_like": "map", "siglip2_img_like": "map",
    }
    assert described["bv_tok"].vit_config["posemb_class_token"] is False
    assert described["bv_gap_sincos"].vit_config["posemb"] == "sincos2d"
    assert described["siglip_img_like"].output.shape == (None, 48)  # img/head projects to 48: a 48-class head
    siglip2 = described["siglip2_img_like"]  # no image head: the model is its MAP embedding
    assert not siglip2.vit_config["include_top"] and siglip2.vit_config["pooling"] == "map"
    assert siglip2.output.shape == (None, 48)


@pytest.mark.parametrize("name", MAP_FIXTURES)
def test_map_head_intermediates_match_big_vision(name):
    ref, _ = big_vision_reference(name)
    model = inferred_model(name)
    head = model.get_layer("pool")
    out = model.features(ref["images"])
    tokens = out["tokens"]
    attended = head.attention(head._probe(tokens), tokens)
    np.testing.assert_allclose(n(attended), ref["map/attn_out"], atol=5e-5)
    np.testing.assert_allclose(n(head.norm(attended)), ref["map/ln_out"], atol=5e-5)
    np.testing.assert_allclose(n(out["pre_logits"]) - n(attended)[:, 0], ref["map/mlp_out"][:, 0], atol=5e-5)


# --- attention maps against a NumPy computation from the raw checkpoint -------------------------------------------


def raw_parameters(name):
    """The fixture's image-tower arrays by big_vision name, read here with NumPy alone (not keras_vit's reader)."""
    with np.load(big_vision_path(name, "ckpt"), allow_pickle=False) as archive:
        arrays = {key: archive[key].astype(np.float64) for key in archive.files}
    return {key.removeprefix("params/img/"): value for key, value in arrays.items() if not key.startswith("params/txt")}


def attention_parameters(arrays, scope, layer=None):
    """q/k/v/out kernels and biases of ``scope``/MultiHeadDotProductAttention_0 (block ``layer`` of a stacked file)."""
    p = {}
    for proj in ("query", "key", "value", "out"):
        for kind in ("kernel", "bias"):
            array = arrays[f"{scope}/MultiHeadDotProductAttention_0/{proj}/{kind}"]
            p[f"{proj}_{kind}"] = array if layer is None else array[layer]
    return p


def block_scope(arrays, i):
    return (f"Transformer/encoderblock_{i}", None) if f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in arrays else (
        "Transformer/encoderblock", i)


@pytest.mark.parametrize("name", FIXTURES)
def test_attention_maps_match_numpy(name):
    ref, config = big_vision_reference(name)
    arrays = raw_parameters(name)
    model = inferred_model(name)
    attentions = keras_vit.attention_maps(model, ref["images"])
    x = ref["out/with_posemb"].astype(np.float64)
    if "cls" in arrays:
        x = np.concatenate([np.broadcast_to(arrays["cls"], (x.shape[0], 1, x.shape[2])), x], axis=1)
    for i in range(config["depth"]):
        scope, layer = block_scope(arrays, i)
        ln = [arrays[f"{scope}/LayerNorm_0/{kind}"] for kind in ("scale", "bias")]
        ln = [a if layer is None else a[layer] for a in ln]
        branch, weights = np_attention(np_layer_norm(x, *ln), attention_parameters(arrays, scope, layer))
        # The NumPy reference is right (it gives big_vision's attention branch), and so are the weights.
        np.testing.assert_allclose(branch, ref[f"out/encoder/block{i:02d}/sa"], atol=5e-5)
        np.testing.assert_allclose(attentions[i], weights, atol=5e-5)
        x = ref[f"out/encoder/block{i:02d}/plus_mlp"].astype(np.float64)
    if config["pool_type"] == "map":
        p = attention_parameters(arrays, "MAPHead_0")
        probe = arrays["MAPHead_0/probe"]
        q = np.einsum("btd,dnh->bnth", np.broadcast_to(probe, (x.shape[0], 1, probe.shape[-1])), p["query_kernel"])
        k = np.einsum("btd,dnh->bnth", ref["out/encoded"].astype(np.float64), p["key_kernel"])
        logits = (q + p["query_bias"][None, :, None]) @ (k + p["key_bias"][None, :, None]).transpose(0, 1, 3, 2)
        logits = logits / np.sqrt(q.shape[-1])
        expected = np.exp(logits - logits.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        pooling = n(model.features(ref["images"], attention=True)["pooling_attention"])
        assert pooling.shape == (4, config["num_heads"], 1, model.grid[0] * model.grid[1])
        np.testing.assert_allclose(pooling, expected, atol=5e-5)


# --- .keras round trip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_keras_round_trip(name, tmp_path):
    ref, _ = big_vision_reference(name)
    model = inferred_model(name)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode=True
    assert isinstance(reloaded, keras_vit.VisionTransformer) and reloaded.vit_config == model.vit_config
    np.testing.assert_allclose(n(reloaded(ref["images"])), ref["logits"], atol=1e-5, rtol=1e-5)
    again = keras_vit.from_official_checkpoint(tmp_path / "model.keras")
    np.testing.assert_allclose(n(again(ref["images"])), ref["logits"], atol=1e-5, rtol=1e-5)
    if reloaded.architecture.pooling == "map":
        assert "pooling_attention" in reloaded.features(ref["images"], attention=True)


# --- reading: layouts, two-tower files, strict matching ------------------------------------------------------


def test_scan_layout_reads_as_the_loop_layout():
    stacked = npz.read_npz(big_vision_path("bv_map_scan", "ckpt"))
    loop = names.normalize_names(npz.read_npz(big_vision_path("bv_map", "ckpt")))
    unstacked = names.normalize_names(stacked)
    assert {k: v.shape for k, v in unstacked.items()} == {k: v.shape for k, v in loop.items()}
    kernel = stacked["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"]
    for i in range(kernel.shape[0]):
        np.testing.assert_array_equal(unstacked[f"Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel"], kernel[i])


def test_two_tower_file_reads_its_image_tower_only():
    two_tower = npz.read_npz(big_vision_path("siglip_img_like", "ckpt"))
    image_tower = names.normalize_names(two_tower)
    plain = names.normalize_names(npz.read_npz(big_vision_path("bv_map", "ckpt")))
    assert set(image_tower) == set(plain)  # no txt/, t or b
    np.testing.assert_array_equal(image_tower["MAPHead_0/probe"], two_tower["params/img/MAPHead_0/probe"])
    scan_tower = names.normalize_names(npz.read_npz(big_vision_path("siglip2_img_like", "ckpt")))
    assert set(scan_tower) == set(plain) - {"head/kernel", "head/bias"}


def test_stacked_blocks_of_unequal_depth_are_an_error(tmp_path):
    arrays = npz.read_npz(big_vision_path("bv_map_scan", "ckpt"))
    arrays["Transformer/encoderblock/LayerNorm_0/bias"] = arrays["Transformer/encoderblock/LayerNorm_0/bias"][:1]
    np.savez(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(ValueError, match=r"disagree on the number of layers \(leading axes \[1, 2\]\)"):
        keras_vit.from_official_checkpoint(tmp_path / "damaged.npz")


def test_matching_is_strict_and_all_or_nothing(tmp_path):
    ref, config = big_vision_reference("siglip2_img_like")
    arguments = builder_arguments(config, ref["images"].shape)
    deeper = keras_vit.vision_transformer(**{**arguments, "num_layers": 3})
    before = [n(v).copy() for v in deeper.weights]
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"2 layers checkpoint; the model is .* 3 layers") as err:
        keras_vit.load_weights(deeper, big_vision_path("siglip2_img_like", "ckpt"))
    assert len(err.value.missing) == 16 and not err.value.unexpected
    assert all(np.array_equal(n(v), b) for v, b in zip(deeper.weights, before))  # nothing was assigned
    arrays = npz.read_npz(big_vision_path("siglip2_img_like", "ckpt"))
    del arrays["params/img/MAPHead_0/LayerNorm_0/scale"]
    np.savez(tmp_path / "incomplete.npz", **arrays)
    model = keras_vit.vision_transformer(**arguments)
    with pytest.raises(keras_vit.CheckpointMismatchError) as error:
        keras_vit.load_weights(model, tmp_path / "incomplete.npz", adapt=False)
    assert error.value.missing == ["MAPHead_0/LayerNorm_0/scale"]


def test_headless_file_takes_a_new_head_on_request():
    ref, _ = big_vision_reference("siglip2_img_like")
    path = big_vision_path("siglip2_img_like", "ckpt")
    model = keras_vit.from_official_checkpoint(path, classes=5)
    assert model.output.shape == (None, 5) and not n(model.get_layer("head").kernel).any()
    np.testing.assert_allclose(n(model.features(ref["images"])["pre_logits"]), ref["logits"], atol=1e-5, rtol=1e-5)
    tokens = keras_vit.from_official_checkpoint(path, include_top=False)
    np.testing.assert_allclose(n(tokens(ref["images"])), ref["out/encoded"], atol=5e-5)


def test_sincos_model_has_no_position_embedding_weights():
    ref, config = big_vision_reference("bv_gap_sincos")
    model = keras_vit.vision_transformer(**builder_arguments(config, ref["images"].shape))
    assert not any("pos_embedding" in name for name in model.official_weights())
    with pytest.raises(ValueError, match=r"image size cannot be read off its arrays: pass image_size"):
        keras_vit.from_official_checkpoint(big_vision_path("bv_gap_sincos", "ckpt"))


def test_a_sincos_file_of_any_size_needs_no_image_size():
    ref, _ = big_vision_reference("bv_gap_sincos")
    model = keras_vit.from_official_checkpoint(big_vision_path("bv_gap_sincos", "ckpt"), input_shape=(None, None, 3))
    assert model.input.shape == (None, None, None, 3)
    np.testing.assert_allclose(n(model(ref["images"])), ref["logits"], atol=1e-5, rtol=1e-5)


def test_non_finite_values_are_refused_only_in_the_arrays_a_model_reads(tmp_path):
    ref, _ = big_vision_reference("siglip_img_like")
    arrays = npz.read_npz(big_vision_path("siglip_img_like", "ckpt"))
    text = next(name for name in arrays if name.startswith("params/txt/") and arrays[name].dtype.kind == "f")
    np.savez(tmp_path / "nan_text.npz", **{**arrays, text: np.full_like(arrays[text], np.nan)})
    model = keras_vit.from_official_checkpoint(tmp_path / "nan_text.npz")  # the text tower is never read
    np.testing.assert_allclose(n(model(ref["images"])), ref["logits"], atol=1e-5, rtol=1e-5)
    image = "params/img/MAPHead_0/probe"
    np.savez(tmp_path / "nan_image.npz", **{**arrays, image: np.full_like(arrays[image], np.nan)})
    with pytest.raises(ValueError, match="MAPHead_0/probe"):
        keras_vit.from_official_checkpoint(tmp_path / "nan_image.npz")


# --- registry: a family resolves by the model's variant; the file decides the classifier ---------------------------

_TINY = dict(patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, image_size=32)


@pytest.mark.parametrize("name, family", [("siglip_img_like", "siglip_webli"), ("siglip2_img_like", "siglip2_webli")])
def test_a_siglip_family_builds_the_map_model_of_its_file(name, family, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "cache"))
    ref, _ = big_vision_reference(name)
    entry = registry.PretrainedWeights(big_vision_path(name, "ckpt").as_uri(), 32, None)
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", family), [entry])
    embedding = keras_vit.ViT_Ti16(weights=family, include_top=False, pooling="map", **_TINY)
    assert embedding.vit_config["classifier"] == "map"
    np.testing.assert_allclose(n(embedding(ref["images"])), ref["out/pre_logits"], atol=1e-5, rtol=1e-5)
    with pytest.raises(keras_vit.CheckpointMismatchError, match="map, 2 layers checkpoint; the model is .* token"):
        keras_vit.create_model("Ti/16-token", weights=family, **_TINY)  # the name chose a class token


def test_big_vision_registry_entries():
    big_vision = {family for family in registry.FAMILIES if family.startswith(("flexivit", "siglip"))}
    assert big_vision == {"flexivit_i1k", "flexivit_i21k", "siglip_webli", "siglip_webli_i18n", "siglip2_webli"}
    for (model, family), entries in registry.REGISTRY.items():
        if family not in big_vision:
            continue
        assert model in keras_vit.list_models()
        for entry in entries:
            assert entry.url.startswith(registry.BIG_VISION_BUCKET + family.split("_")[0] + "/")
            assert "value_range(-1, 1)" in entry.preprocessing
            assert (entry.classes is None) == family.startswith("siglip")
            if family.startswith("siglip"):  # the resolution is in the file name
                assert f"_{entry.resolution}" in entry.file_name
    assert registry.resolve("ViT-B_16", "siglip2_webli", 384).file_name == "siglip2_b16_384.npz"
    assert registry.resolve("ViT-L_16", "siglip_webli", 224).file_name == "webli_en_l16_256_60552751.npz"
    assert {registry.resolve(m, "flexivit_i1k").file_name for m in ("ViT-B_8", "ViT-B_16", "ViT-B_32")} == {
        "flexivit_b_i1k.npz"}


# --- FlexiViT: a checkpoint at another patch size -------------------------------------------------------------------


@pytest.mark.parametrize("patch", [2, 3, 6, 8])
def test_flexivit_patch_resize_is_big_visions(patch):
    path = big_vision_path("bv_tok", "ckpt")
    kernel = npz.read_npz(path)["embedding/kernel"]
    model = keras_vit.from_official_checkpoint(path, patch_size=patch, image_size=8 * patch)
    resize = flexivit_resize_matrix(4, patch)
    expected = (np.linalg.pinv(resize.T) @ kernel.reshape(16, -1).astype(np.float64)).reshape(patch, patch, 3, -1)
    np.testing.assert_allclose(n(model.get_layer("embedding").kernel), expected, atol=1e-5)


def test_flexivit_checkpoint_at_another_patch_size_answers_the_same_on_grown_patches(monkeypatch, tmp_path):
    """Growing 4x4 patches to 8x8 loses nothing: the resampled kernel gives the same tokens, hence the same logits."""
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "cache"))
    ref, _ = big_vision_reference("bv_tok")
    grown = grow_patches(ref["images"], 4, 8)
    model = keras_vit.from_official_checkpoint(big_vision_path("bv_tok", "ckpt"), patch_size=8, image_size=64)
    np.testing.assert_allclose(n(model(grown)), ref["logits"], atol=1e-4)
    entry = registry.PretrainedWeights(big_vision_path("bv_tok", "ckpt").as_uri(), 32, 10)
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", "flexivit_i1k"), [entry])
    family = keras_vit.ViT_Ti16(weights="flexivit_i1k", classes=10, **{**_TINY, "patch_size": 8, "image_size": 64})
    assert family.vit_config["posemb_class_token"] is False  # from the file: no class-token row
    np.testing.assert_allclose(n(family(grown)), ref["logits"], atol=1e-4)
