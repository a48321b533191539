"""Pretrained weights: posemb interpolation, adaptation rules, registry download, CLI tools."""

import hashlib
import os
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
from conftest import PLAIN_FIXTURES, REPO, builder_kwargs, fixture_path, flexivit_resize_matrix, grow_patches, load_reference
from keras_vit import cli
from keras_vit.official_names import official_arrays
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
    with pytest.raises(ValueError):
        keras_vit.interpolate_posemb(np.zeros((1, 63, 4)), (4, 4))  # 62 grid rows after the class token
    with pytest.raises(ValueError, match="no class-token row"):  # 64 = 8 x 8: big_vision's table, no class row
        keras_vit.interpolate_posemb(np.zeros((1, 64, 4)), (4, 4))
    assert keras_vit.interpolate_posemb(np.zeros((1, 64, 4)), (4, 4), num_prefix_tokens=0).shape == (1, 16, 4)


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
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"this is a ViT-D48-N3-M96/4 token, 2 layers checkpoint; the model is ViT-Ti/16 token"):
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
        for entry in (entry for entry in entries if not entry.is_hub):  # timm's: tests/test_timm.py
            assert entry.url.startswith((registry.BUCKET, registry.BIG_VISION_BUCKET)) and entry.url.endswith(".npz")
            assert entry.preprocessing.startswith("(pixels - 127.5) / 127.5")
            if entry.url.startswith(registry.BUCKET):  # the 2020 files (big_vision's: tests/test_big_vision.py)
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


def test_family_download_through_the_registry(cache, monkeypatch, posemb48, server):
    url = f"{server}/official_vit/vit_tiny_token.ckpt.npz"
    entry = registry.PretrainedWeights(url, 32, 10, sha256=_sha256(fixture_path("vit_tiny_token", "ckpt")))
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", "augreg_in21k"), [entry])
    model = keras_vit.ViT_Ti16(weights="augreg_in21k", image_size=48, classes=10, **_tiny_overrides())
    _check_48(model, posemb48)
    cached = list(cache.iterdir())
    assert [p.name for p in cached] == [download.cached_name(entry.url)] and _sha256(cached[0]) == entry.sha256
    assert cached[0].name.startswith("official_vit--vit_tiny_token.ckpt--") and cached[0].suffix == ".npz"
    keras_vit.ViT_Ti16(weights="augreg_in21k", image_size=48, classes=10, **_tiny_overrides())
    assert server.requests == ["/official_vit/vit_tiny_token.ckpt.npz"]  # the second time from the cache


def test_url_weights_of_a_local_file_are_read_in_place(cache):
    ref, _ = load_reference("vit_tiny_gap")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_gap", "ckpt").as_uri())
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    assert not cache.exists()  # nothing copied


def test_a_local_file_of_another_hash_is_refused_and_kept(cache, tmp_path):
    source = tmp_path / "vit.npz"
    source.write_bytes(b"PK\x03\x04 a local file")
    assert download.fetch(source.as_uri()) == source
    with pytest.raises(download.HashMismatchError) as refused:
        download.fetch(source.as_uri(), sha256="0" * 64)
    assert (refused.value.path, refused.value.expected, refused.value.found, refused.value.deleted) == (
        source, "0" * 64, _sha256(source), False)
    assert source.exists() and not cache.exists()
    with pytest.raises(ValueError):
        download.fetch("file://elsewhere/vit.npz")
    with pytest.raises(ValueError):
        download.fetch("gs://bucket/vit.npz")


def test_hash_mismatch_deletes_the_download(cache, server):
    with pytest.raises(download.HashMismatchError, match="does not have the expected sha256 0000.*it was deleted") as refused:
        download.fetch(f"{server}/ok.npz", sha256="0" * 64)
    assert refused.value.deleted and refused.value.found == _sha256(fixture_path("vit_tiny_token", "ckpt"))
    assert not any(cache.iterdir())


def test_unreachable_url_fails_fast_with_instructions(cache):
    with socket.socket() as probe:  # a loopback port with nothing listening: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}/vit/x.npz.*place it at .*cache.*vit--x--[0-9a-f]{{16}}.npz"):
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


class _Server(str):
    """A local server's base URL; ``served`` (path -> bytes, or ``("redirect", location)``) adds answers,
    ``requests`` lists the paths asked for."""

    def __new__(cls, url):
        server = super().__new__(cls, url)
        server.served, server.requests = {}, []
        return server


@pytest.fixture
def server():
    """A local HTTP server: ``served`` paths (``_Server``), ``/page.npz`` and ``/download`` (HTML pages served with
    200), ``/short.npz`` (closes after half the announced bytes), ``/trickle.npz`` (one byte every 0.1 s, never
    done), any other path the tiny fixture. Yields its ``_Server`` URL."""
    import http.server

    checkpoint = fixture_path("vit_tiny_token", "ckpt").read_bytes()
    page = b"<!DOCTYPE html><html><body>Sign in to download</body></html>"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            base.requests.append(self.path)
            answer = base.served.get(self.path)
            if isinstance(answer, tuple):
                self.send_response(302)
                self.send_header("Location", answer[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, content_type = (page, "text/html") if self.path in ("/page.npz", "/download") else (answer or checkpoint, "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/short.npz":
                self.wfile.write(body[: len(body) // 2])
            elif self.path == "/trickle.npz":
                for byte in body[:300]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = _Server(f"http://127.0.0.1:{httpd.server_address[1]}")
    yield base
    httpd.shutdown()
    httpd.server_close()


def test_a_download_cut_short_is_not_cached(cache, server):
    with pytest.raises(ConnectionError, match=r"short.npz \(the connection closed after [\d,]+ of the [\d,]+ bytes announced\); nothing was cached"):
        download.fetch(f"{server}/short.npz")
    assert list(cache.iterdir()) == []
    path = download.fetch(f"{server}/ok.npz")
    assert path.read_bytes() == fixture_path("vit_tiny_token", "ckpt").read_bytes()


def test_a_trickling_server_meets_the_overall_deadline_and_leaves_no_temporary(cache, server):
    seen = []
    watcher = threading.Thread(target=lambda: (time.sleep(0.8), seen.extend(p.name for p in cache.iterdir())), daemon=True)
    watcher.start()
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"not complete after the 1.5 s deadline, \d+ bytes received\); nothing was cached"):
        download.fetch(f"{server}/trickle.npz", timeout=5, deadline=1.5)
    assert time.monotonic() - start < 4  # each byte comes within the 5 s timeout: only the deadline ends it
    watcher.join()
    assert len(seen) == 1 and seen[0].startswith(f".{download.cached_name(f'{server}/trickle.npz')}.") and seen[0].endswith(".part")
    assert list(cache.iterdir()) == []


def test_temporaries_of_killed_downloads_are_cleaned_once_stale(cache, server):
    cache.mkdir()
    stale, live = cache / ".vit--a.npz.k1ll3d.part", cache / ".vit--b.npz.w0rk1n.part"
    stale.write_bytes(b"half a download")
    live.write_bytes(b"a download in progress elsewhere")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    download.fetch(f"{server}/ok.npz")
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("path", ["/page.npz", "/download"])
def test_a_web_page_served_with_200_is_not_cached_as_a_checkpoint(cache, server, path):
    with pytest.raises(ValueError, match=r"the server sent a web page \(text/html, starting b'<!DOCTYPE ht'\), not the .* expected: the address is wrong or needs a login.*Nothing was cached"):
        download.fetch(server + path)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("setting, reason", [("a_file", "it is a file, not a folder"), ("a_file/below", "a folder above it is a file")])
def test_a_cache_variable_that_cannot_hold_files_is_named(tmp_path, monkeypatch, setting, reason):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / setting))
    with pytest.raises(download.CacheFolderError) as error:
        keras_vit.from_official_checkpoint("http://127.0.0.1:9/vit/x.npz")
    assert (error.value.folder, error.value.variable, error.value.reason) == (tmp_path / setting, "KERAS_VIT_CACHE", reason)


def test_a_cache_folder_error_message_names_the_folder_the_variable_and_the_way_out(monkeypatch):
    # the one message-text test of CacheFolderError
    monkeypatch.setenv("KERAS_VIT_CACHE", "/x/c")
    assert str(download.CacheFolderError("/x/c", "KERAS_VIT_CACHE", "it is a file, not a folder")) == (
        "The download cache folder /x/c (set by KERAS_VIT_CACHE=/x/c) cannot be used: it is a file, not a folder. "
        "Set KERAS_VIT_CACHE to a folder you can write to (it is created if missing), or unset it to use "
        "~/.keras/keras_vit.")


# --- tools -------------------------------------------------------------------------------------------------------


def _run(tool, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_convert_tool_bad_input_writes_nothing(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(fixture_path("vit_tiny_token", "ckpt").read_bytes()[:5000])
    result = _run("convert_jax_checkpoint.py", corrupt, tmp_path / "out.keras")
    assert result.returncode != 0 and "truncated or corrupt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz"]
    assert "--image-size" in _run("convert_jax_checkpoint.py", "--help").stdout


@pytest.mark.slow
def test_interpolate_tool_on_every_format(tmp_path, posemb48):
    source = fixture_path("vit_tiny_token", "ckpt")
    assert _run("interpolate_posemb.py", source, tmp_path / "48.npz", "--image-size", 48).returncode == 0
    _check_48(keras_vit.from_official_checkpoint(tmp_path / "48.npz"), posemb48)

    model = keras_vit.from_official_checkpoint(source)
    model.save(tmp_path / "32.keras")
    assert _run("interpolate_posemb.py", tmp_path / "32.keras", tmp_path / "48.keras", "--image-size", "48").returncode == 0
    _check_48(keras.models.load_model(tmp_path / "48.keras"), posemb48)

    model.save_weights(tmp_path / "32.weights.h5")
    no_architecture = _run("interpolate_posemb.py", tmp_path / "32.weights.h5", tmp_path / "48.weights.h5", "--image-size", "48")
    assert no_architecture.returncode != 0 and "--architecture" in no_architecture.stderr
    assert _run("interpolate_posemb.py", tmp_path / "32.weights.h5", tmp_path / "48.weights.h5", "--image-size", "48", "--architecture", source).returncode == 0
    at48 = keras_vit.resize_model(model, 48)
    for variable in at48.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    at48.load_weights(tmp_path / "48.weights.h5")
    _check_48(at48, posemb48)

    same = _run("interpolate_posemb.py", tmp_path / "48.npz", tmp_path / "48.npz", "--image-size", "64", "--force")
    assert same.returncode != 0 and "is the input file" in same.stderr
    assert cli.parse_size("384,512") == (384, 512) and cli.parse_size("224") == 224


def test_the_tools_end_the_library_s_errors_with_one_line_naming_their_flags(tmp_path, capsys):
    source = str(fixture_path("vit_tiny_token", "ckpt"))
    assert cli.convert_main([source, str(tmp_path / "out.keras"), "--image-size", "33"]) == 2  # not a multiple of 4
    err = capsys.readouterr().err
    assert err.startswith("keras-vit-convert: error: ") and err.count("\n") == 1
    assert "--image-size" in err and "image_size" not in err
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not an archive")
    assert cli.interpolate_main([str(corrupt), str(tmp_path / "out.npz"), "--image-size", "48"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as usage:
        cli.convert_main([source, str(tmp_path / "out.keras"), "--classes", "0"])  # built 10 classes before
    assert usage.value.code == 2 and "--classes" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz"]


def test_a_killed_conversion_s_temporary_is_deleted_once_stale(tmp_path):
    stale, live = tmp_path / ".out.keras.k1ll3d.keras", tmp_path / ".out.keras.w0rk1n.keras"
    stale.write_bytes(b"half a model")
    live.write_bytes(b"a conversion in progress elsewhere")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cli.convert_main([str(fixture_path("vit_tiny_token", "ckpt")), str(tmp_path / "out.keras")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out.keras"]


# --- preprocessing -------------------------------------------------------------------------------------------------


def test_preprocess_input_maps_pixels_to_minus_one_one():
    pixels = np.array([[0, 127.5, 255]], "float32")
    np.testing.assert_allclose(n(keras_vit.preprocess_input(pixels)), [[-1, 0, 1]])
    np.testing.assert_allclose(n(keras_vit.preprocess_input(np.array([0, 255], "uint8"))), [-1, 1])
    np.testing.assert_allclose(n(keras_vit.preprocess_input(np.zeros((2, 4, 4, 3), "float32"))), -1)  # black


@pytest.mark.parametrize("images", [
    np.array([[-1.0, 0.0, 1.0]], "float32"),  # already preprocessed: applied twice
    np.array([[0.0, 0.25, 1.0]], "float32"),  # floats in [0, 1]
    np.array([[0, 1000, 65535]], "uint16"),  # 16-bit pixels
])
def test_preprocess_input_refuses_what_is_not_pixels_in_0_255(images):
    with pytest.raises(ValueError):
        keras_vit.preprocess_input(images)


def test_a_model_with_include_preprocessing_refuses_images_in_minus_one_one():
    model = keras_vit.vision_transformer(image_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=3,
                                         mlp_dim=24, classes=3, include_preprocessing=True)
    with pytest.raises(ValueError, match="include_preprocessing"):
        model(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype("float32"))
    assert model(np.full((2, 8, 8, 3), 200, "uint8")).shape == (2, 3)


def test_decode_predictions_takes_a_positive_top_and_reads_a_models_class_names():
    scores = np.array([[0.5, 2.0, -1.0]], "float32")
    for top in (-1, 0, True, 1.5):
        with pytest.raises(ValueError):
            keras_vit.decode_predictions(scores, top=top, class_names=["ant", "bee", "cat"])
    assert len(keras_vit.decode_predictions(scores, top=10, class_names=["ant", "bee", "cat"])[0]) == 3
    model = keras_vit.vision_transformer(image_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=3,
                                         mlp_dim=24, classes=3, class_names=["ant", "bee", "cat"])
    assert keras_vit.decode_predictions(scores, top=1, model=model) == [[(1, "bee", 2.0)]]


def test_decode_predictions_uses_the_shipped_class_names():
    scores = np.zeros((2, 1000), "float32")
    scores[0, 1], scores[0, 0], scores[1, 999] = 3.0, 2.0, 1.0
    decoded = keras_vit.decode_predictions(scores, top=2)
    assert decoded[0] == [("n01443537", "goldfish", 3.0), ("n01440764", "tench", 2.0)]
    assert decoded[1][0] == ("n15075141", "toilet tissue", 1.0)
    with pytest.raises(ValueError, match=r"expects \(batch, 1000\)"):
        keras_vit.decode_predictions(np.zeros((1, 10)))


def test_decode_predictions_takes_the_class_names_of_another_head():
    scores = np.array([[0.5, 2.0, -1.0], [5.0, 0.0, 4.0]], "float32")
    decoded = keras_vit.decode_predictions(scores, top=2, class_names=["ant", "bee", "cat"])
    assert decoded == [[(1, "bee", 2.0), (0, "ant", 0.5)], [(0, "ant", 5.0), (2, "cat", 4.0)]]
    with pytest.raises(ValueError, match=r"expects \(batch, 2\) scores, one per class name, got shape \(2, 3\)"):
        keras_vit.decode_predictions(scores, class_names=["ant", "bee"])


@pytest.mark.slow
def test_interpolate_tool_keeps_names_and_storage_types(tmp_path):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    np.savez(tmp_path / "bf16.npz", **{f"params/{k}": v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()})
    stored = npz.read_npz(tmp_path / "bf16.npz")  # bfloat16 comes back as 2-byte void data
    result = _run("interpolate_posemb.py", tmp_path / "bf16.npz", tmp_path / "bf16_48.npz", "--image-size", "48")
    assert result.returncode == 0
    assert "\x1b[" not in result.stdout + result.stderr  # no progress bar's escapes on a non-terminal output
    resized = npz.read_npz(tmp_path / "bf16_48.npz")
    assert resized.keys() == stored.keys() and all(v.dtype == stored[k].dtype for k, v in resized.items())
    key = f"params/{POSEMB}"
    assert resized[key].shape == (1, 145, 48)
    expected = keras_vit.interpolate_posemb(npz.decode_array(stored[key]), (12, 12))
    np.testing.assert_allclose(npz.decode_array(resized[key]), expected, rtol=1e-2, atol=1e-3)  # bfloat16 rounding
    np.testing.assert_array_equal(resized["params/cls"].view(np.uint16), stored["params/cls"].view(np.uint16))


def test_rectangular_checkpoint_needs_an_image_size(tmp_path):
    model = keras_vit.resize_model(keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt")), (32, 48))
    np.savez(tmp_path / "rect.npz", **official_arrays(model))
    with pytest.raises(ValueError, match=r"image size cannot be read off its arrays: pass image_size"):
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


@pytest.mark.slow
def test_console_scripts_are_installed():
    for script in ("keras-vit-convert", "keras-vit-interpolate-posemb"):
        result = subprocess.run([script, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


# --- adapt: input channels, patch size (FlexiViT), logging -----------------------------------------------------


def _np_adapt_input_conv(kernel, channels):
    """timm's adapt_input_conv, written for HWIO kernels: sum for 1 channel, else repeat and scale by 3 / channels."""
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeated = np.concatenate([kernel] * int(np.ceil(channels / 3)), axis=2)[:, :, :channels]
    return repeated * (3 / channels)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_input_channels_are_adapted_as_timm_and_logged(channels, caplog):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    with caplog.at_level("INFO", logger="keras_vit.pretrained.adapt"):
        model = keras_vit.create_model(
            "Ti/16", weights=fixture_path("vit_tiny_token", "ckpt"), input_shape=(32, 32, channels), classes=10,
            **_tiny_overrides(),
        )
    expected = _np_adapt_input_conv(arrays["embedding/kernel"].astype(np.float64), channels)
    np.testing.assert_allclose(n(model.get_layer("embedding").kernel), expected, atol=1e-6)
    notes = [r.getMessage() for r in caplog.records if r.name == "keras_vit.pretrained.adapt"]
    assert len([m for m in notes if f"to {channels} input channels" in m]) == 1


def test_a_grey_image_gets_the_colour_models_answer_to_that_grey():
    ref, _ = load_reference("vit_tiny_token")
    grey = ref["images"].mean(-1, keepdims=True)
    colour = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    mono = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), channels=1)
    np.testing.assert_allclose(
        mono.predict(grey, verbose=0), colour.predict(np.repeat(grey, 3, -1), verbose=0), atol=1e-5
    )


def test_hybrid_root_convolution_is_adapted_to_the_input_channels():
    arrays = npz.read_npz(fixture_path("hybrid_tiny", "ckpt"))
    model = keras_vit.from_official_checkpoint(fixture_path("hybrid_tiny", "ckpt"), channels=4)
    expected = _np_adapt_input_conv(arrays["conv_root/kernel"].astype(np.float64), 4)
    np.testing.assert_allclose(n(model.get_layer("conv_root").kernel), expected, atol=1e-6)
    np.testing.assert_array_equal(n(model.get_layer("embedding").kernel), arrays["embedding/kernel"])


@pytest.mark.parametrize("old, new", [(4, 8), (4, 6), (8, 4), (16, 10)])
def test_patch_kernel_resampling_is_flexivits_pseudo_inverse(old, new):
    kernel = np.random.default_rng(0).normal(size=(old, old, 3, 5)).astype("float32")
    resize = flexivit_resize_matrix(old, new)
    expected = (np.linalg.pinv(resize.T) @ kernel.reshape(old * old, -1).astype(np.float64)).reshape(new, new, 3, 5)
    resampled = keras_vit.resample_patch_kernel(kernel, (new, new))
    assert resampled.dtype == np.float32
    np.testing.assert_allclose(resampled, expected, atol=1e-5)
    if new >= old:  # growing: the token of a resized patch equals the old token of the patch, <x, w> = <Bx, w'>
        patches = np.random.default_rng(1).normal(size=(7, old * old, 3))
        grown = np.einsum("np,bpc->bnc", resize, patches)
        np.testing.assert_allclose(
            np.einsum("bpc,pcd->bd", grown, resampled.reshape(new * new, 3, 5)),
            np.einsum("bpc,pcd->bd", patches, kernel.reshape(old * old, 3, 5)),
            atol=1e-4,
        )


def test_a_model_at_another_patch_size_answers_the_same_on_grown_patches(caplog):
    ref, _ = load_reference("vit_tiny_token")
    grown = grow_patches(ref["images"].astype(np.float64), 4, 8)
    with caplog.at_level("INFO", logger="keras_vit.pretrained.adapt"):
        model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), patch_size=8, image_size=64)
    assert any("Resampled the patch-embedding kernel from 4x4 to 8x8" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(model.predict(grown, verbose=0), ref["logits"], atol=1e-4)
    resized = keras_vit.resize_model(keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt")), 64, patch_size=8)
    np.testing.assert_allclose(resized.predict(grown, verbose=0), ref["logits"], atol=1e-4)


@pytest.mark.slow
def test_interpolate_tool_resamples_the_patch_kernel(tmp_path):
    ref, _ = load_reference("vit_tiny_token")
    result = _run("interpolate_posemb.py", fixture_path("vit_tiny_token", "ckpt"), tmp_path / "p8.npz", "--image-size", 64, "--patch-size", 8)
    assert result.returncode == 0, result.stderr
    model = keras_vit.from_official_checkpoint(tmp_path / "p8.npz")
    assert model.get_layer("embedding").patch_size == (8, 8) and model.grid == (8, 8)
    grown = grow_patches(ref["images"].astype(np.float64), 4, 8)
    np.testing.assert_allclose(model.predict(grown, verbose=0), ref["logits"], atol=1e-4)


# --- registry, cache names -------------------------------------------------------------------------------------


def test_registry_has_every_official_file_of_the_issue():
    files = {(model, family, entry.path) for (model, family), entries in registry.REGISTRY.items() for entry in entries}
    for model in ("ViT-B_8", "R26+ViT-B_32", "R50+ViT-L_32"):
        assert (model, "imagenet21k", f"imagenet21k/{model}.npz") in files
    assert ("ViT-B_8", "imagenet21k+imagenet2012", "imagenet21k+imagenet2012/ViT-B_8.npz") in files
    for model in ("ViT-L_16", "ViT-L_32"):
        assert (model, "sam", f"sam/{model}.npz") in files
    assert not any(path == "sam/ViT-S_16.npz" for _, _, path in files)  # left out: see registry.py


def test_augreg_fine_tunes_name_their_upstream_run():
    differing = set()
    for (model, family), entries in registry.REGISTRY.items():
        if family != "augreg_in21k_ft_in1k":
            continue
        for entry in entries:
            assert entry.upstream and entry.file_name.startswith(entry.upstream + "--imagenet2012")
            if registry.differs_from_augreg_in21k(model, entry):
                differing.add((model, entry.resolution))
    assert differing == {("ViT-S_32", 224), ("ViT-B_32", 224), ("ViT-B_8", 224), ("ViT-L_16", 224), ("R26+ViT-S_32", 224)}


# A URL's path chooses only a plain file name inside the cache: every encoding of a separator, '..', NUL, an absolute
# name, a double encoding, a backslash and an overlong name (Errno 36 before) end up as one bounded file in the cache.
ESCAPING_PATHS = [
    "/{outside}",  # the absolute path of a file outside the cache, every '/' as %2F
    "/%2E%2E%2F%2E%2E%2Fescaped.npz",
    "/x/..%2F..%2F..%2Fescaped.npz",
    "/%252E%252E%252Fescaped.npz",
    "/a%5C..%5C..%5Cescaped.npz",
    "/nul%00name.npz",
    "/%2E%2E",
    "/" + "A" * 5000 + ".npz",
]


@pytest.mark.parametrize("path", ESCAPING_PATHS)
def test_a_url_fills_only_a_file_inside_the_cache(tmp_path, monkeypatch, server, path):
    import urllib.parse

    cache = tmp_path / "home" / "user" / "cache"
    monkeypatch.setenv("KERAS_VIT_CACHE", str(cache))
    url = server + path.format(outside=urllib.parse.quote(str(tmp_path / "outside.npz"), safe=""))
    fetched = download.fetch(url)
    assert fetched.parent == cache and fetched.resolve().parent == cache.resolve() and fetched.is_file()
    assert len(fetched.name) <= download.MAX_NAME and not fetched.name.startswith(".")
    assert not set(fetched.name) & set("/\\\0%") and fetched.name.endswith(".npz") == url.endswith(".npz")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [fetched]  # nothing outside the cache, no temporary


def test_a_symbolic_link_at_a_cache_name_is_not_read(cache, server, tmp_path):
    url = f"{server}/vit/ok.npz"
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"PK\x03\x04 not the download")
    cache.mkdir()
    (cache / download.cached_name(url)).symlink_to(outside)
    fetched = download.fetch(url)
    assert not fetched.is_symlink() and fetched.read_bytes() == fixture_path("vit_tiny_token", "ckpt").read_bytes()
    assert outside.read_bytes() == b"PK\x03\x04 not the download" and server.requests == ["/vit/ok.npz"]


def test_redirects_stay_on_the_host_or_go_to_https(cache, server):
    server.served["/moved.npz"] = ("redirect", f"{server}/ok.npz")
    fetched = download.fetch(f"{server}/moved.npz")  # the same host: followed, cached under the name asked for
    assert fetched.name == download.cached_name(f"{server}/moved.npz") and server.requests == ["/moved.npz", "/ok.npz"]
    elsewhere = server.replace("127.0.0.1", "localhost") + "/ok.npz"
    server.served["/away.npz"] = ("redirect", elsewhere)
    with pytest.raises(download.UnsafeRedirectError) as refused:
        download.fetch(f"{server}/away.npz")
    assert (refused.value.url, refused.value.location) == (f"{server}/away.npz", elsewhere)
    assert [p.name for p in cache.iterdir()] == [fetched.name] and server.requests[-1] == "/away.npz"
    download._check_redirect("https://huggingface.co/x/resolve/main/a.npz", "https://cdn-lfs.hf.co/a.npz")  # allowed
    for url, location in [("https://host/a.npz", "http://host/a.npz"), ("http://host/a.npz", "ftp://host/a.npz")]:
        with pytest.raises(download.UnsafeRedirectError):
            download._check_redirect(url, location)


def test_readme_weights_table_is_the_registrys():
    readme = (REPO / "README.md").read_text()
    assert registry.weights_table() in readme


def test_cache_names_can_be_typed_and_old_names_of_official_files_are_found(cache):
    url = registry.resolve("R50+ViT-B_16", "imagenet21k+imagenet2012").url
    name = download.cached_name(url)
    assert "%2B" in url and name.startswith("imagenet21k+imagenet2012--R50+ViT-B_16--") and name.endswith(".npz")
    cache.mkdir()
    for old in ("imagenet21k%2Bimagenet2012--R50%2BViT-B_16.npz", "imagenet21k+imagenet2012--R50+ViT-B_16.npz"):
        (cache / old).write_bytes(b"cached")
        assert download.fetch(url) == cache / old  # found without network
        (cache / old).unlink()


def test_distinct_urls_never_share_a_cache_file(cache, server):
    """Two URLs ending in the same folder/file used to share one entry: the second got the first's weights."""
    urls = []
    for run in ("run1", "run2"):
        server.served[f"/{run}/ckpt/vit.npz"] = f"PK\x03\x04 weights of {run}".encode()
        urls.append(f"{server}/{run}/ckpt/vit.npz")
    paths = [download.fetch(url) for url in urls]
    assert paths[0] != paths[1] and [p.read_bytes()[-4:] for p in paths] == [b"run1", b"run2"]
    assert download.cached_name(urls[0] + "?v=2") != download.cached_name(urls[0])
    # An old-style name means one file only in the official bucket: elsewhere it may be another URL's.
    (cache / "ckpt--vit.npz").write_bytes(b"PK\x03\x04 another URL's file")
    (cache / paths[0].name).unlink()
    assert download.fetch(urls[0]).read_bytes().endswith(b"run1")
# --- clear errors ------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_variant_says_what_the_file_is(tmp_path):
    small = keras_vit.create_model("Ti/16", num_layers=1)
    np.savez(tmp_path / "ti16.npz", **official_arrays(small))
    with pytest.raises(keras_vit.CheckpointMismatchError) as error:
        keras_vit.create_model("S/16", num_layers=1, weights=tmp_path / "ti16.npz")
    message = str(error.value)
    first = message.splitlines()[0]
    assert "this is a ViT-Ti/16 token, 1 layers checkpoint; the model is ViT-S/16 token, 1 layers" in first
    assert "Shape mismatch (" in message and len(message) < 1500


def test_token_checkpoint_into_a_gap_model_is_an_architecture_error():
    with pytest.raises(keras_vit.CheckpointMismatchError, match="token, 2 layers checkpoint; the model is .* gap") as error:
        keras_vit.create_model("Ti/16-gap", weights=fixture_path("vit_tiny_token", "ckpt"), image_size=32, classes=10, **_tiny_overrides())
    assert "square grid" not in str(error.value)


def test_a_corrupt_array_is_named(tmp_path):
    import zipfile

    source = fixture_path("vit_tiny_token", "ckpt")
    target = tmp_path / "corrupt.npz"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for info in original.infolist():
            data = original.read(info)
            copy.writestr(info, b"\x93NUMPY garbage" if info.filename == "cls.npy" else data)
    with pytest.raises(ValueError, match=r"array 'cls' is (corrupt|unreadable)") as error:
        keras_vit.from_official_checkpoint(target)
    assert "embedding" not in str(error.value)


@pytest.mark.slow
def test_a_keras_file_is_not_taken_for_an_npz(tmp_path):
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    model.save(tmp_path / "vit.keras")
    (tmp_path / "vit.npz").write_bytes((tmp_path / "vit.keras").read_bytes())
    with pytest.raises(ValueError, match="is a Keras .keras model file, not an official .npz checkpoint"):
        keras_vit.from_official_checkpoint(tmp_path / "vit.npz")
    result = _run("convert_jax_checkpoint.py", tmp_path / "vit.keras", tmp_path / "out.keras")
    assert result.returncode != 0 and "already a Keras file" in result.stderr and not (tmp_path / "out.keras").exists()


def test_an_unknown_weights_family_lists_the_families():
    with pytest.raises(ValueError, match=r"Unknown weights 'imagenet': give a weights family \(imagenet21k, "):
        keras_vit.ViT_Ti16(weights="imagenet", num_layers=1)


def test_a_corrupt_file_in_the_cache_says_to_delete_it(cache, monkeypatch):
    data = fixture_path("vit_tiny_token", "ckpt").read_bytes()
    entry = registry.PretrainedWeights("https://example.invalid/vit/tiny.npz", 32, 10)
    monkeypatch.setitem(registry.REGISTRY, ("ViT-Ti_16", "augreg_in21k"), [entry])
    cache.mkdir()
    (cache / download.cached_name(entry.url)).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"download cache: delete it \(or move it aside\)"):
        keras_vit.ViT_Ti16(weights="augreg_in21k", image_size=32, classes=10, **_tiny_overrides())


def test_optimizer_state_arrays_are_ignored(tmp_path):
    ref, _ = load_reference("vit_tiny_token")
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    full = {f"opt/target/{k}": v for k, v in arrays.items()}
    full.update({f"opt/state/param_states/{k}/grad_ema": np.zeros_like(v) for k, v in arrays.items()})
    np.savez(tmp_path / "full.npz", **full)
    model = keras_vit.from_official_checkpoint(tmp_path / "full.npz")
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
