"""Weights out (``keras_vit.save_weights``): every shared fixture written back in its own layout is the file it
came from, array for array; what a layout cannot hold is refused and writes nothing; files are never written over
without ``overwrite=True`` and never left half-written.

The oracles are the shared fixtures themselves (the official JAX code's, big_vision's and timm's files), read back
with NumPy's and the safetensors library's own readers. timm itself reading the files is the CI leg's
``tests/timm_round_trip.py``.
"""

import json

import keras
import numpy as np
import pytest
from conftest import (
    PLAIN_FIXTURES,
    TIMM_FIXTURES,
    TIMM_TODAY,
    big_vision_path,
    big_vision_reference,
    fixture_path,
    timm_fixture_model,
    timm_reference,
)
from safetensors.numpy import load_file

import keras_vit
from keras_vit.pretrained import save as save_lib
from keras_vit.pretrained.safetensors_file import read_safetensors
from keras_vit.pretrained.timm import read_timm, timm_arguments
from keras_vit.pretrained.timm_entry_points import TIMM_DEFAULTS
from keras_vit.pretrained.timm_names import from_official

n = keras.ops.convert_to_numpy
OFFICIAL_FIXTURES = (*PLAIN_FIXTURES, "hybrid_tiny")
BIG_VISION_NAMES = ("bv_map", "bv_map_scan", "bv_tok", "bv_gap_sincos", "siglip_img_like", "siglip2_img_like")
TIMM_NAMES = sorted(path.name for path in TIMM_FIXTURES.iterdir() if path.is_dir())
TINY = dict(image_size=8, patch_size=4, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, classes=3)


def _npz(path):
    with np.load(path, allow_pickle=False) as file:
        return {key: file[key] for key in file.files}


def assert_identical(found, expected):
    """The same names, and per name the same shape, dtype and values."""
    assert sorted(found) == sorted(expected)
    for name, array in expected.items():
        assert found[name].shape == array.shape and found[name].dtype == array.dtype, name
        np.testing.assert_array_equal(found[name], array, err_msg=name)


def _images(model, batch=2, seed=0):
    shape = (batch, *model.input.shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype("float32")


def _randomized(model, seed=1):
    """``model`` with every weight random (heads are zero-initialised), so that every array matters."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model


def tiny(**overrides):
    return _randomized(keras_vit.vision_transformer(**{**TINY, **overrides}))


# --- round trips of the shared fixtures ----------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFICIAL_FIXTURES)
def test_official_fixtures_round_trip_array_for_array(name, tmp_path):
    """Every array of the official file: names, shapes, dtypes (float32) and values, bit for bit."""
    source = fixture_path(name, "ckpt")
    written = keras_vit.save_weights(keras_vit.from_official_checkpoint(source), tmp_path / "out.npz")
    assert_identical(_npz(written), _npz(source))


def _image_tower(arrays):
    """A two-tower file's image tower (``params/img/...``, the prefix removed), or the file's arrays."""
    tower = {key.removeprefix("params/img/"): a for key, a in arrays.items() if key.startswith("params/img/")}
    return tower or arrays


@pytest.mark.parametrize("name", BIG_VISION_NAMES)
def test_big_vision_fixtures_round_trip_array_for_array(name, tmp_path):
    """What keras_vit reads of big_vision's file, array for array: the whole file for the ViTs; for the two-tower
    (SigLIP-like) files the image tower ``params/img/`` with its prefix removed (the text tower ``params/txt/``
    and ``params/t``, ``params/b`` are not the image model's and are not compared). The layout is inferred from
    the ``.npz`` name: each of these models needs big_vision's names (MAP head, sin-cos, a class token without a
    row)."""
    source = big_vision_path(name, "ckpt")
    ref, config = big_vision_reference(name)
    size = {"image_size": ref["images"].shape[1:3]} if config["posemb"] == "sincos2d" else {}
    model = keras_vit.from_official_checkpoint(source, **size)
    original = _image_tower(_npz(source))
    scan = any(key.startswith("Transformer/encoderblock/") for key in original)
    written = keras_vit.save_weights(model, tmp_path / "out.npz", scan=scan)
    assert_identical(_npz(written), original)


def _merged(arguments):
    """timm arguments with image and patch sizes as pairs, for comparison."""
    pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    return {key: pair(v) if key in ("img_size", "patch_size") else v for key, v in arguments.items()}


@pytest.mark.parametrize("name", TIMM_TODAY)
def test_timm_fixtures_round_trip_through_a_hub_folder(name, tmp_path):
    """keras_vit -> a timm folder: timm's own state dict name for name (safetensors' reader), a config that makes
    the same timm model, and keras_vit reads it back as it read the fixture, giving timm's outputs."""
    model, ref = timm_fixture_model(name, tmp_path), timm_reference(name)
    folder = keras_vit.save_weights(model, tmp_path / "repo")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert_identical(load_file(folder / "model.safetensors"), load_file(TIMM_FIXTURES / name / "model.safetensors"))
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (folder, TIMM_FIXTURES / name))
    assert _merged(timm_arguments(ours["architecture"], ours["model_args"])) == _merged(
        timm_arguments(theirs["architecture"], theirs["model_args"]))
    back, original = read_timm(folder), read_timm(TIMM_FIXTURES / name)
    assert back.arguments == original.arguments
    assert_identical(back.arrays, original.arrays)
    assert back.preprocessing == dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0,
                                      crop_mode="squash", input_size=model.architecture.native_image_size)
    key = "logits" if "logits" in ref else "pre_logits"  # a headless file's output is its pooled vector
    np.testing.assert_allclose(n(_timm_model(folder, tmp_path)(ref["images"])), ref[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_name_rules_invert_for_every_fixture(name):
    """All eight fixtures, also those whose options today's layers lack: timm -> official -> timm is the identity."""
    assert_identical(from_official(read_timm(TIMM_FIXTURES / name).arrays),
                     read_safetensors(TIMM_FIXTURES / name / "model.safetensors"))


# --- what each layout holds ---------------------------------------------------------------------------------

# model -> ({layout that refuses it: how many of its parts that layout lacks}, the layouts the refusal names);
# written from what the three codes build: the official one (class token with a row, token / gap pooling, hybrids,
# pre_logits, tanh GELU), big_vision's vit.py (no row, MAP / gap / token pooling, sin-cos, pre_logits, tanh GELU),
# timm's VisionTransformer (registers, every pooling, either GELU; no hybrid stem, no pre_logits)
REFUSALS = {
    "registers": (dict(num_register_tokens=2), {"official": 1, "big_vision": 2}, ("timm",)),
    "map": (dict(classifier="map"), {"official": 1}, ("big_vision", "timm")),
    "max": (dict(classifier="max"), {"official": 1, "big_vision": 1}, ("timm",)),
    "sincos": (dict(classifier="gap", posemb="sincos2d"), {"official": 1}, ("big_vision", "timm")),
    "no_class_row": (dict(posemb_class_token=False), {"official": 1}, ("big_vision", "timm")),
    "class_row": (dict(), {"big_vision": 1}, ("official", "timm")),
    "hybrid": (dict(image_size=16, patch_size=1, resnet_layers=(1,)), {"big_vision": 2, "timm": 1}, ("official",)),
    "pre_logits": (dict(classifier="gap", representation_size=4), {"timm": 1}, ("official", "big_vision")),
    "erf": (dict(gelu="erf"), {"official": 1, "big_vision": 2}, ("timm",)),
}


@pytest.mark.parametrize("kind", REFUSALS)
@pytest.mark.parametrize("layout", save_lib.LAYOUTS)
def test_what_a_layout_cannot_hold_is_refused_naming_one_that_can(kind, layout, tmp_path):
    arguments, refusing, use = REFUSALS[kind]
    model = tiny(**arguments)
    path = tmp_path / ("out.npz" if layout != "timm" else "repo")
    if layout not in refusing:
        keras_vit.save_weights(model, path, layout=layout)
        return
    with pytest.raises(keras_vit.LayoutError) as caught:
        keras_vit.save_weights(model, path, layout=layout)
    assert (caught.value.layout, caught.value.use, len(caught.value.missing)) == (layout, use, refusing[layout])
    assert list(tmp_path.iterdir()) == []


def test_the_layout_follows_the_path():
    arch = lambda **a: keras_vit.Architecture.from_arguments(**{**TINY, **a})  # noqa: E731
    assert save_lib.infer_layout("w.npz", arch()) == "official"
    assert save_lib.infer_layout("w.npz", arch(classifier="map")) == "big_vision"
    assert save_lib.infer_layout("w.npz", arch(num_register_tokens=1)) == "official"  # refused there, naming timm
    assert save_lib.infer_layout("repo", arch()) == save_lib.infer_layout("w.safetensors", arch()) == "timm"


@pytest.mark.parametrize("path, layout", [("w.safetensors", "official"), ("repo", "big_vision"), ("w.npz", "timm")])
def test_a_path_of_another_layout_is_refused(path, layout, tmp_path):
    with pytest.raises(ValueError, match=layout):
        keras_vit.save_weights(tiny(), tmp_path / path, layout=layout)
    with pytest.raises(ValueError, match="scan"):
        keras_vit.save_weights(tiny(), tmp_path / "w.npz", layout="official", scan=True)


# --- timm: the parts it holds differently, the same outputs ---------------------------------------------------

def _timm_model(folder, tmp_path):
    """A keras_vit model of the timm folder keras_vit wrote, through keras_vit's timm reader."""
    checkpoint = read_timm(folder)
    model = keras_vit.vision_transformer(**checkpoint.arguments)
    np.savez(tmp_path / "read.npz", **checkpoint.arrays)
    return keras_vit.load_weights(model, tmp_path / "read.npz", adapt=False)


@pytest.mark.parametrize("arguments", [
    dict(num_register_tokens=2),  # a class token with a row beside registers without: the row folds into it
    dict(classifier="gap", posemb="sincos2d", gelu="erf"),  # fixed embeddings: a table of their values
    dict(posemb="sincos2d", gelu="erf"),  # ... added before the class token (timm's no_embed_class)
    dict(classifier="map", include_top=False, pooling="map", num_register_tokens=1),
    dict(channels=1, image_size=(8, 12), patch_size=(4, 2), mlp_dim=13),  # rectangular, grey, an odd MLP ratio
    dict(pre_norm=True, gelu="quick", layer_norm_epsilon=1e-5),  # CLIP's: the epsilon picks a CLIP entry point
    dict(classifier="gap", num_register_tokens=4, fc_norm=True, layer_scale=0.5, qkv_bias=False, qk_norm=True),
])
def test_timm_folders_read_back_with_the_same_outputs(arguments, tmp_path):
    model = tiny(**arguments)
    images = _images(model)
    folder = keras_vit.save_weights(model, tmp_path / "repo")
    np.testing.assert_allclose(n(_timm_model(folder, tmp_path)(images)), n(model(images)), atol=1e-5, rtol=0)


def test_a_bare_safetensors_file_holds_the_state_dict_of_the_folder(tmp_path):
    model = tiny(classifier="gap")
    folder = keras_vit.save_weights(model, tmp_path / "repo")
    bare = keras_vit.save_weights(model, tmp_path / "model-weights.safetensors")
    assert_identical(load_file(bare), load_file(folder / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-weights.safetensors", "repo"]


def test_timm_config_names_the_model_as_timm_builds_it(tmp_path):
    """A ViT-B/16 at 384 px names timm's ViT-B/16 at 384 px; every argument differing from timm's defaults is in
    ``model_args``, and the class names travel as timm's ``label_names``."""
    arch = keras_vit.Architecture.from_arguments(image_size=384, classes=10)
    config = save_lib.timm_config(arch, class_names=list("abcdefghij"))
    assert config["architecture"] == "vit_base_patch16_384"
    assert config["model_args"] == dict(img_size=[384, 384], num_classes=10, global_pool="token", in_chans=3,
                                         patch_size=16, embed_dim=768, depth=12, num_heads=12, act_layer="gelu_tanh")
    assert config["label_names"] == list("abcdefghij") and config["pretrained_cfg"]["input_size"] == [3, 384, 384]
    assert all(key in TIMM_DEFAULTS for key in config["model_args"])


# --- what the written weights are: LoRA merged, quantized refused unless dequantized ----------------------------

def test_a_lora_model_writes_the_weights_it_applies(tmp_path):
    model = tiny()
    model.enable_lora(2)
    for variable in model.trainable_weights:  # the LoRA factors (and the head): random, so the adapters matter
        variable.assign(np.random.default_rng(3).normal(0, 0.3, variable.shape).astype("float32"))
    images = _images(model)
    path = keras_vit.save_weights(model, tmp_path / "lora.npz")
    plain = keras_vit.load_weights(keras_vit.vision_transformer(**TINY), path, adapt=False)
    np.testing.assert_allclose(n(plain(images)), n(model(images)), atol=1e-5, rtol=0)


def test_a_quantized_model_is_refused_unless_dequantized(tmp_path):
    model = tiny(num_layers=1)
    model.quantize("int8")
    with pytest.raises(save_lib.QuantizedModelError) as caught:
        keras_vit.save_weights(model, tmp_path / "q.npz")
    assert caught.value.modes == ("int8",) and list(tmp_path.iterdir()) == []
    path = keras_vit.save_weights(model, tmp_path / "q.npz", dequantize=True)
    plain = keras_vit.load_weights(keras_vit.vision_transformer(**{**TINY, "num_layers": 1}), path, adapt=False)
    images = _images(model)
    expected = n(keras_vit.backbone.dequantized_copy(model)(images))
    np.testing.assert_allclose(n(plain(images)), expected, atol=1e-5, rtol=0)


# --- files: never over an existing one without overwrite=True, never half-written -----------------------------

def test_an_existing_file_is_not_replaced_without_overwrite(tmp_path):
    source = tmp_path / "vit.npz"
    source.write_bytes(fixture_path("vit_tiny_token", "ckpt").read_bytes())
    model = keras_vit.from_official_checkpoint(source)
    model.get_layer("head").kernel.assign(np.ones(model.get_layer("head").kernel.shape, "float32"))
    before = source.read_bytes()
    with pytest.raises(FileExistsError) as caught:
        keras_vit.save_weights(model, source)  # the file the model was loaded from
    assert caught.value.filename == str(source) and source.read_bytes() == before
    keras_vit.save_weights(model, source, overwrite=True)
    np.testing.assert_array_equal(_npz(source)["head/kernel"], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.npz"]


def test_an_existing_folder_keeps_its_other_files(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "README.md").write_text("model card")
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError) as caught:
        keras_vit.save_weights(tiny(), folder)
    assert caught.value.filename == str(folder / "config.json")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json"]
    keras_vit.save_weights(tiny(), folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "model card" and read_timm(folder).arguments["classes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("target", ["w.npz", "w.safetensors", "repo"])
def test_a_file_that_does_not_read_back_is_never_put_in_place(target, tmp_path, monkeypatch):
    """A writer that puts other values in the file than it was given (here: one value changed) is caught by the
    read-back; the target is not created and no temporary file is left."""
    write = save_lib._write

    def wrong_write(path, contents):
        if not path.name.endswith(".json"):
            name = sorted(contents)[0]
            contents = {**contents, name: contents[name] + 1}
        write(path, contents)

    monkeypatch.setattr(save_lib, "_write", wrong_write)
    with pytest.raises(save_lib.ReadBackError) as caught:
        keras_vit.save_weights(tiny(classifier="gap"), tmp_path / target)
    assert len(caught.value.names) == 1
    assert list(tmp_path.iterdir()) == []


# --- the command line ---------------------------------------------------------------------------------------

def test_keras_vit_convert_writes_a_keras_model_in_each_layout(tmp_path, capsys):
    from keras_vit import cli

    model = tiny(classifier="gap")
    model.save(tmp_path / "model.keras")
    for layout, target in (("official", "w.npz"), ("big_vision", "bv.npz"), ("timm", "repo")):
        assert cli.convert_main([str(tmp_path / "model.keras"), "--to", layout, str(tmp_path / target)]) == 0
    assert_identical(_npz(tmp_path / "w.npz"), keras_vit.official_names.official_arrays(model))
    assert_identical(read_timm(tmp_path / "repo").arrays, keras_vit.official_names.official_arrays(model))
    capsys.readouterr()
    # an existing output, in the command line's words: one line, status 2
    assert cli.convert_main([str(tmp_path / "model.keras"), "--to", "official", str(tmp_path / "w.npz")]) == 2
    assert "--force" in capsys.readouterr().err
    tiny(classifier="map").save(tmp_path / "map.keras")
    # what the official layout cannot hold names the layout that can
    assert cli.convert_main([str(tmp_path / "map.keras"), "--to", "official", str(tmp_path / "map.npz")]) == 2
    assert "big_vision" in capsys.readouterr().err
    assert not (tmp_path / "map.npz").exists()
