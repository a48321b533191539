"""Exports (SavedModel, TFLite float/float16/int8, ONNX) verified against Keras; the same files on other backends."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import keras_vit
from conftest import REPO, fixture_path, load_reference
from keras_vit import export

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports go through TensorFlow")


@pytest.fixture(scope="module")
def fixture_model():
    ref, _ = load_reference("vit_tiny_token")
    return keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt")), ref


def test_saved_model_serves_bytes_and_pixels(tmp_path, fixture_model):
    import tensorflow as tf

    model, ref = fixture_model
    result = export.export(model, tmp_path / "served", images=ref["images"], top_k=3)
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    served = tf.saved_model.load(str(tmp_path / "served"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    outputs = served.signatures["serving_default"](image_bytes=tf.constant(encoded))
    expected = model.predict(keras.ops.convert_to_numpy(keras_vit.preprocess_input(pixels)), verbose=0)
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(outputs["top_k_classes"].numpy(), np.argsort(-expected, axis=1)[:, :3])
    by_pixels = served.signatures["serve_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(by_pixels["logits"].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("quantization", [None, "float16", "int8"])
def test_tflite(tmp_path, fixture_model, quantization):
    model, ref = fixture_model
    result = export.export(model, tmp_path / "vit.tflite", "tflite", quantization, images=ref["images"])
    assert result["top1_agreement"] == 1.0  # quantized: top-1 kept on the fixture inputs
    if quantization is None:
        assert result["max_abs_diff"] <= 1e-4
    else:
        assert 0 < result["max_abs_diff"] < 0.1 and result["bytes"] < 0.7 * 207_000


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_onnx_for_both_gelu_forms(tmp_path, form):
    keras.utils.set_random_seed(0)
    model = keras_vit.vision_transformer(32, 4, 48, 2, 3, 96, classes=10, gelu=form)
    for variable in model.weights:  # a non-zero head, so the outputs say something
        variable.assign(np.random.default_rng(1).normal(scale=0.2, size=variable.shape).astype("float32"))
    result = export.export(model, tmp_path / "vit.onnx", "onnx")
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0


def test_existing_path_refused_and_failed_export_leaves_nothing(tmp_path, fixture_model, monkeypatch):
    model, ref = fixture_model
    (tmp_path / "taken.onnx").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="pass force=True"):
        export.export(model, tmp_path / "taken.onnx", "onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"
    monkeypatch.setattr(export, "FLOAT_TOLERANCE", -1.0)  # every comparison now fails
    with pytest.raises(ValueError, match="nothing was written"):
        export.export(model, tmp_path / "failed.tflite", "tflite", images=ref["images"][:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]


def test_export_tool(tmp_path):
    command = [sys.executable, "tools/export.py", str(fixture_path("vit_tiny_token", "ckpt")), str(tmp_path / "vit.tflite"),
               "--format", "tflite", "--quantization", "int8"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout[: result.stdout.rindex("}") + 1])["top1_agreement"] > 0.5
    assert "tflite/int8:" in result.stdout and "top-1 agreement" in result.stdout
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr


def test_keras_file_saved_under_tensorflow_gives_the_same_outputs_under_jax(tmp_path, fixture_model):
    pytest.importorskip("jax", reason="the JAX backend is the optional extra [jax]: pip install -e \".[jax]\"")
    model, ref = fixture_model
    model.save(tmp_path / "vit.keras")
    np.save(tmp_path / "images.npy", ref["images"])
    script = (
        "import numpy as np, keras, keras_vit;"
        f"m = keras.models.load_model({str(tmp_path / 'vit.keras')!r});"
        f"np.save({str(tmp_path / 'jax.npy')!r}, np.asarray(m.predict(np.load({str(tmp_path / 'images.npy')!r}), verbose=0)))"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "jax.npy"), ref["logits"], atol=1e-5)
