"""Pretrained weights: posemb interpolation, adaptation rules, registry download, CLI tools."""

import hashlib
import socket
import subprocess
import sys
import threading
import time

import keras
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage

import keras_vit
from conftest import PLAIN_FIXTURES, REPO, builder_kwargs, fixture_path, load_reference
from keras_vit import cli
from keras_vit.pretrained import config as pconfig
from keras_vit.pretrained import download, names, npz, registry

n = keras.ops.convert_to_numpy
POSEMB = "Transformer/posembed_input/pos_embedding"


@pytest.fixture
def posemb48():
    return load_reference("vit_tiny_token_posemb48")[0]


def _posemb(model):
    return n(model.get_layer("posembed_input").pos_embedding)


# --- interpolation -------------------------------------------------------------------------------------------


def test_interpolation_equals_official_fixture(posemb48):
    resized = keras_vit.interpolate_posemb(posemb48["posemb_original"], (12, 12))
    assert resized.dtype == np.float32
    np.testing.assert_allclose(resized, posemb48["posemb_resized"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("source, target", [((5, 7), (9, 4)), ((4, 4), (7, 11)), ((6, 3), (6, 3)), ((3, 5), (1, 2))])
@pytest.mark.parametrize("prefix", [0, 1])
def test_interpolation_equals_scipy_zoom_on_rectangular_grids(source, target, prefix):
    rng = np.random.default_rng(1)
    posemb = rng.normal(size=(1, prefix + source[0] * source[1], 6)).astype("float32")
    grid = posemb[0, prefix:].reshape(*source, 6).astype("float64")
    zoom = (target[0] / source[0], target[1] / source[1], 1)
    expected = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, -1, 6)
    resized = keras_vit.interpolate_posemb(posemb, target, num_prefix_tokens=prefix, source_grid=source)
    np.testing.assert_array_equal(resized[:, :prefix], posemb[:, :prefix])
    np.testing.assert_allclose(resized[:, prefix:], expected, atol=1e-6)


def test_a_source_that_is_not_a_grid_is_an_error():
    with pytest.raises(ValueError, match="63 position embeddings do not form a square grid"):
        keras_vit.interpolate_posemb(np.zeros((1, 64, 4)), (4, 4))


# --- loading paths that reproduce the official 48 px outputs ---------------------------------------------------


def _check_48(model, ref):
    np.testing.assert_allclose(_posemb(model), ref["posemb_resized"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5, rtol=0)


def _tiny_overrides():
    return dict(patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)


def test_weights_path_at_another_resolution(posemb48):
    model = keras_vit.create_model("Ti/16", weights=fixture_path("vit_tiny_token", "ckpt"), image_size=48, classes=10, **_tiny_overrides())
    _check_48(model, posemb48)


def test_resize_model(posemb48):
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    _check_48(keras_vit.resize_model(model, 48), posemb48)
    assert _posemb(model).shape == (1, 65, 48)  # the original is untouched
    rectangular = keras_vit.resize_model(model, (32, 48))
    back = keras_vit.resize_model(rectangular, 48)  # from a rectangular grid
    expected = keras_vit.interpolate_posemb(_posemb(rectangular), (12, 12), source_grid=(8, 12))
    np.testing.assert_allclose(_posemb(back), expected, atol=1e-7)


@pytest.mark.parametrize("name", PLAIN_FIXTURES)
def test_from_official_checkpoint_needs_no_other_argument(name):
    ref, config = load_reference(name)
    model = keras_vit.from_official_checkpoint(fixture_path(name, "ckpt"))
    assert model.count_params() == keras_vit.vision_transformer(**builder_kwargs(config)).count_params()
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5, rtol=0)


def test_new_head_and_no_top(posemb48):
    ref, _ = load_reference("vit_tiny_repr")
    path = fixture_path("vit_tiny_repr", "ckpt")
    model = keras_vit.from_official_checkpoint(path, classes=5)
    assert model.output.shape == (None, 5) and "pre_logits" not in [layer.name for layer in model.layers]
    assert not n(model.get_layer("head").kernel).any()
    features = keras_vit.from_official_checkpoint(path, include_top=False, pooling="token", representation_size=48)
    np.testing.assert_allclose(features.predict(ref["images"], verbose=0), ref["pre_logits"], atol=1e-5)
    sequence = keras_vit.from_official_checkpoint(path, include_top=False)
    assert sequence.output.shape == (None, 65, 48)


def test_checkpoint_of_another_variant_is_a_clear_error():
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"embedding/kernel: \(4, 4, 3, 48\) vs \(16, 16, 3, 192\)"):
        keras_vit.ViT_Ti16(weights=fixture_path("vit_tiny_token", "ckpt"))


def test_bfloat16_bit_patterns_and_linen_layouts_load(tmp_path):
    ref, _ = load_reference("vit_tiny_token")
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    as_bf16 = {f"params/{k}": v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}
    np.savez(tmp_path / "bf16.npz", **as_bf16)
    assert npz.read_npz(tmp_path / "bf16.npz")["params/cls"].dtype.kind == "V"
    model = keras_vit.from_official_checkpoint(tmp_path / "bf16.npz")
    np.testing.assert_array_equal(_posemb(model), arrays[POSEMB].astype(ml_dtypes.bfloat16).astype("float32"))
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=0.05)


def test_group_norm_arrays_are_flattened():
    arrays = names.normalize_names({"gn_root/scale": np.ones((1, 1, 1, 8)), "block1/unit1/gn3/bias": np.ones((1, 1, 1, 4))})
    assert arrays["gn_root/scale"].shape == (8,) and arrays["block1/unit1/gn3/bias"].shape == (4,)


# --- registry and download -------------------------------------------------------------------------------------


def test_registry_entries():
    for (model, family), entries in registry.REGISTRY.items():
        assert family in registry.FAMILIES and model in keras_vit.list_models()
        for entry in entries:
            assert entry.url.startswith(registry.BUCKET) and entry.url.endswith(".npz")
            assert entry.resolution in (224, 384) and entry.classes in (1000, registry.IN21K_CLASSES)
    assert registry.resolve("ViT-B_16", "imagenet21k+imagenet2012", 384).url.endswith("%2Bimagenet2012/ViT-B_16.npz")
    assert registry.resolve("ViT-B_16", "imagenet21k+imagenet2012", 224).url.endswith("ViT-B_16-224.npz")
    with pytest.raises(ValueError, match="No 'sam' weights were released for ViT-Ti_16. Available: augreg_in21k"):
        keras_vit.ViT_Ti16(weights="sam")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KERAS_VIT_CACHE", str(folder))
    return folder


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_family_download_through_the_registry(cache, monkeypatch, posemb48):
    source = fixture_path("vit_tiny_token", "ckpt")
    entry = registry.PretrainedWeights(source.as_uri(), 32, 10, sha256=_sha256(source))
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", "augreg_in21k"), [entry])
    model = keras_vit.ViT_Ti16(weights="augreg_in21k", image_size=48, classes=10, **_tiny_overrides())
    _check_48(model, posemb48)
    cached = list(cache.iterdir())
    assert [p.name for p in cached] == ["official_vit--vit_tiny_token.ckpt.npz"] and _sha256(cached[0]) == entry.sha256
    # Served from the cache the second time: the source may be gone.
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", "augreg_in21k"), [registry.PretrainedWeights(
        "file:///nonexistent/official_vit/vit_tiny_token.ckpt.npz", 32, 10, sha256=entry.sha256)])
    keras_vit.ViT_Ti16(weights="augreg_in21k", image_size=48, classes=10, **_tiny_overrides())


def test_url_weights(cache):
    ref, _ = load_reference("vit_tiny_gap")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_gap", "ckpt").as_uri())
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)


def test_hash_mismatch_deletes_the_download(cache):
    source = fixture_path("vit_tiny_token", "ckpt")
    with pytest.raises(ValueError, match="does not have the expected sha256 0000.*it was deleted"):
        download.fetch(source.as_uri(), sha256="0" * 64)
    assert not any(cache.iterdir())


def test_unreachable_url_fails_fast_with_instructions(cache):
    with socket.socket() as probe:  # a loopback port with nothing listening: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}/vit/x.npz.*place it at .*cache.*vit--x.npz"):
        download.fetch(f"http://127.0.0.1:{port}/vit/x.npz")
    assert time.monotonic() - start < 5 and not any(cache.iterdir())


def test_silent_server_times_out(cache):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts the connection, never answers
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match="timed out"):
            download.fetch(f"http://127.0.0.1:{server.getsockname()[1]}/x.npz", timeout=1)
    finally:
        server.close()
        for connection, _ in accepted:
            connection.close()
    assert time.monotonic() - start < 10


# --- tools -------------------------------------------------------------------------------------------------------


def _run(tool, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize("output", ["vit.keras", "vit.weights.h5"])
def test_convert_tool(tmp_path, output):
    ref, _ = load_reference("vit_tiny_repr")
    target = tmp_path / output
    result = _run("convert_jax_checkpoint.py", fixture_path("vit_tiny_repr", "ckpt"), target, "--verify")
    assert result.returncode == 0, result.stderr
    assert "representation_size: 48" in result.stdout and "parameters: 46,917" in result.stdout
    assert "verify: largest output difference after reload 0" in result.stdout
    if output.endswith(".keras"):
        reloaded = keras.models.load_model(target)
    else:
        reloaded = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_repr", "ckpt"))
        for variable in reloaded.weights:
            variable.assign(np.zeros(variable.shape, variable.dtype))
        reloaded.load_weights(target)
    np.testing.assert_allclose(reloaded.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    before = target.read_bytes()
    refused = _run("convert_jax_checkpoint.py", fixture_path("vit_tiny_repr", "ckpt"), target)
    assert refused.returncode != 0 and "exists; pass --force" in refused.stderr
    assert target.read_bytes() == before


def test_convert_tool_bad_input_writes_nothing(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(fixture_path("vit_tiny_token", "ckpt").read_bytes()[:5000])
    result = _run("convert_jax_checkpoint.py", corrupt, tmp_path / "out.keras")
    assert result.returncode != 0 and "truncated or corrupt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz"]
    assert "--image-size" in _run("convert_jax_checkpoint.py", "--help").stdout


def test_interpolate_tool_on_every_format(tmp_path, posemb48):
    source = fixture_path("vit_tiny_token", "ckpt")
    assert _run("interpolate_posemb.py", source, tmp_path / "48.npz", "--image-size", 48).returncode == 0
    _check_48(keras_vit.from_official_checkpoint(tmp_path / "48.npz"), posemb48)

    model = keras_vit.from_official_checkpoint(source)
    model.save(tmp_path / "32.keras")
    assert _run("interpolate_posemb.py", tmp_path / "32.keras", tmp_path / "48.keras", "--image-size", "48").returncode == 0
    _check_48(keras.models.load_model(tmp_path / "48.keras"), posemb48)

    model.save_weights(tmp_path / "32.weights.h5")
    assert _run("interpolate_posemb.py", tmp_path / "32.weights.h5", tmp_path / "48.weights.h5", "--image-size", "48").returncode == 0
    at48 = keras_vit.resize_model(model, 48)
    for variable in at48.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    at48.load_weights(tmp_path / "48.weights.h5")
    _check_48(at48, posemb48)

    same = _run("interpolate_posemb.py", tmp_path / "48.npz", tmp_path / "48.npz", "--image-size", "64", "--force")
    assert same.returncode != 0 and "is the input file" in same.stderr
    assert cli.parse_size("384,512") == (384, 512) and cli.parse_size("224") == 224


# --- preprocessing -------------------------------------------------------------------------------------------------


def test_preprocess_input_maps_pixels_to_minus_one_one():
    pixels = np.array([[0, 127.5, 255]], "float32")
    np.testing.assert_allclose(n(keras_vit.preprocess_input(pixels)), [[-1, 0, 1]])
    np.testing.assert_allclose(n(keras_vit.preprocess_input(np.array([0, 255], "uint8"))), [-1, 1])


def test_decode_predictions_uses_the_shipped_class_names():
    scores = np.zeros((2, 1000), "float32")
    scores[0, 1], scores[0, 0], scores[1, 999] = 3.0, 2.0, 1.0
    decoded = keras_vit.decode_predictions(scores, top=2)
    assert decoded[0] == [("n01443537", "goldfish", 3.0), ("n01440764", "tench", 2.0)]
    assert decoded[1][0] == ("n15075141", "toilet tissue", 1.0)
    with pytest.raises(ValueError, match=r"expects \(batch, 1000\)"):
        keras_vit.decode_predictions(np.zeros((1, 10)))


def test_interpolate_tool_keeps_names_and_storage_types(tmp_path):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    np.savez(tmp_path / "bf16.npz", **{f"params/{k}": v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()})
    stored = npz.read_npz(tmp_path / "bf16.npz")  # bfloat16 comes back as 2-byte void data
    assert _run("interpolate_posemb.py", tmp_path / "bf16.npz", tmp_path / "bf16_48.npz", "--image-size", "48").returncode == 0
    resized = npz.read_npz(tmp_path / "bf16_48.npz")
    assert resized.keys() == stored.keys() and all(v.dtype == stored[k].dtype for k, v in resized.items())
    key = f"params/{POSEMB}"
    assert resized[key].shape == (1, 145, 48)
    expected = keras_vit.interpolate_posemb(npz.decode_array(stored[key]), (12, 12))
    np.testing.assert_allclose(npz.decode_array(resized[key]), expected, rtol=1e-2, atol=1e-3)  # bfloat16 rounding
    np.testing.assert_array_equal(resized["params/cls"].view(np.uint16), stored["params/cls"].view(np.uint16))


def test_rectangular_checkpoint_needs_an_image_size(tmp_path):
    model = keras_vit.resize_model(keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt")), (32, 48))
    np.savez(tmp_path / "rect.npz", **names.model_arrays(model))
    with pytest.raises(ValueError, match="rectangular position-embedding grid: pass image_size"):
        keras_vit.from_official_checkpoint(tmp_path / "rect.npz")
    again = keras_vit.from_official_checkpoint(tmp_path / "rect.npz", image_size=(32, 48))
    np.testing.assert_array_equal(_posemb(again), _posemb(model))
    # A rectangular .keras model carries its grid: it loads as is, and into another size with interpolation.
    model.save(tmp_path / "rect.keras")
    np.testing.assert_array_equal(_posemb(keras_vit.from_official_checkpoint(tmp_path / "rect.keras")), _posemb(model))
    square = keras_vit.create_model("Ti/16", weights=tmp_path / "rect.keras", image_size=48, classes=10, **_tiny_overrides())
    expected = keras_vit.interpolate_posemb(_posemb(model), (12, 12), source_grid=(8, 12))
    np.testing.assert_allclose(_posemb(square), expected, atol=1e-7)


def test_keras_and_weights_h5_files_as_weights(tmp_path):
    ref, _ = load_reference("vit_tiny_token")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    model.save(tmp_path / "vit.keras")
    model.save_weights(tmp_path / "vit.weights.h5")
    new_head = keras_vit.create_model("Ti/16", weights=tmp_path / "vit.keras", image_size=32, classes=3, **_tiny_overrides())
    assert new_head.output.shape == (None, 3) and not n(new_head.get_layer("head").kernel).any()
    np.testing.assert_array_equal(_posemb(new_head), _posemb(model))
    same = keras_vit.create_model("Ti/16", weights=tmp_path / "vit.weights.h5", image_size=32, classes=10, **_tiny_overrides())
    np.testing.assert_allclose(same.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)


def test_console_scripts_are_installed():
    for script in ("keras-vit-convert", "keras-vit-interpolate-posemb"):
        result = subprocess.run([script, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout
