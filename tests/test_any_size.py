"""One model, any image size: position embeddings resampled in the graph with the official loader's numbers."""

import keras
import numpy as np
import pytest

import keras_vit
from conftest import fixture_path
from keras_vit.layers import embedding

BACKEND = keras.backend.backend()
SIZES = [(32, 32), (48, 48), (32, 48), (64, 40), (16, 24)]


def _images(size, count=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (count, *size, 3)).astype("float32")


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float32)


@pytest.mark.parametrize("name", ["vit_tiny_token", "vit_tiny_gap", "vit_tiny_repr", "hybrid_tiny"])
def test_any_size_model_equals_the_model_built_at_each_size(name):
    # The fixed-size model at S loads the checkpoint through the official interpolation (NumPy, float64); the
    # any-size model resamples in the graph at every call: the same logits.
    path = fixture_path(name, "ckpt")
    model = keras_vit.from_official_checkpoint(path, input_shape=(None, None, 3))
    assert model.input.shape == (None, None, None, 3) and model.grid == (None, None)
    for size in SIZES if name != "hybrid_tiny" else [(32, 32), (48, 48), (32, 64), (64, 40)]:
        fixed = keras_vit.from_official_checkpoint(path, image_size=size)
        images = _images(size)
        np.testing.assert_allclose(_numpy(model(images)), _numpy(fixed(images)), atol=1e-5, err_msg=str(size))
        assert model.grid_for(images) == fixed.grid


def test_native_size_runs_no_resampling(monkeypatch):
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3))
    calls = []
    original = embedding.resize_grid
    monkeypatch.setattr(embedding, "resize_grid", lambda *a: calls.append(a[2]) or original(*a))
    model(_images((32, 32)))
    assert calls == []
    model(_images((48, 32)))
    assert calls == [(12, 8)]


def test_partly_open_input_shape_and_constructors():
    model = keras_vit.ViT_Ti16(input_shape=(32, None, 3), num_layers=1, classes=3, image_size=32)
    assert model.input.shape == (None, 32, None, 3)
    assert model.architecture.native_image_size == (32, 32)
    assert model(_images((32, 64))).shape == (2, 3)
    named = keras_vit.create_model("Ti/16", input_shape=(None, None, 3), num_layers=1, classes=3)
    assert named.architecture.native_image_size == (224, 224) and named.architecture.posemb_shape == (1, 197, 192)


def test_sides_that_are_not_multiples_are_refused_or_padded():
    model = keras_vit.vision_transformer(image_size=(None, None), native_image_size=16, patch_size=4, hidden_size=12,
                                         num_layers=1, num_heads=3, mlp_dim=24, classes=3)
    with pytest.raises(ValueError) as caught:
        model(_images((18, 16)))
    assert "height" in str(caught.value) and "18" in str(caught.value) and "dynamic_padding=True" in str(caught.value)
    padded = keras_vit.vision_transformer(**{**model.vit_config, "dynamic_padding": True})
    padded.set_weights(model.get_weights())
    images = _images((18, 14))
    zeros = np.zeros((2, 20, 16, 3), "float32")
    zeros[:, :18, :14] = images  # timm's dynamic_img_pad: zeros at the bottom and right
    np.testing.assert_allclose(_numpy(padded(images)), _numpy(model(zeros)), atol=1e-6)
    assert padded.grid_for(images) == (5, 4)


def test_sincos_and_registers_at_any_size():
    from test_layers import _np_sincos

    model = keras_vit.vision_transformer(image_size=(None, None), native_image_size=16, patch_size=4, hidden_size=12,
                                         num_layers=1, num_heads=3, mlp_dim=24, classifier="gap", posemb="sincos2d",
                                         num_register_tokens=2)
    images = _images((12, 20))
    probe = keras.Model(model.inputs[0], model.get_layer("dropout").output)
    n = _numpy
    kernel, bias = n(model.get_layer("embedding").kernel), n(model.get_layer("embedding").bias)
    patches = images.reshape(2, 3, 4, 5, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 15, -1) @ kernel.reshape(-1, 12) + bias
    np.testing.assert_allclose(n(probe(images))[:, 2:], patches + _np_sincos(3, 5, 12), atol=1e-5)


def test_features_and_analysis_follow_the_call():
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3))
    for size in [(32, 32), (24, 40)]:
        images = _images(size)
        grid = model.grid_for(images)
        out = model.features(images, blocks=True, attention=True)
        tokens = 1 + grid[0] * grid[1]
        assert out["tokens"].shape == (2, tokens, 48)
        assert out["blocks"][-1].shape == (2, tokens, 48) and out["attention"][0].shape == (2, 3, tokens, tokens)
        rollout = keras_vit.attention_rollout(model, images)
        assert rollout["grid"].shape == (2, *grid) and rollout["image"].shape == (2, *size)
        assert keras_vit.analysis.model_attention_distance(model, images).shape == (2, 3)


def test_saves_reloads_and_trains_on_batches_of_one_size(tmp_path):
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_gap", "ckpt"), input_shape=(None, None, 3),
                                               classes=4)
    model.save(tmp_path / "any.keras")
    reloaded = keras.models.load_model(tmp_path / "any.keras")
    for size in [(32, 32), (40, 24)]:
        np.testing.assert_array_equal(_numpy(reloaded(_images(size))), _numpy(model(_images(size))))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    labels = keras.utils.to_categorical(np.arange(8) % 4, 4)
    before = _numpy(model(_images((32, 32))))
    for size in [(32, 32), (48, 40)]:
        history = model.fit(_images(size, count=8), labels, batch_size=4, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    assert np.abs(_numpy(model(_images((32, 32)))) - before).max() > 1e-4


def test_mixed_precision_at_any_size():
    path = fixture_path("vit_tiny_token", "ckpt")
    model = keras_vit.from_official_checkpoint(path, input_shape=(None, None, 3), dtype="mixed_bfloat16")
    fixed = keras_vit.from_official_checkpoint(path, image_size=(48, 32))
    images = _images((48, 32))
    logits = model(images)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    np.testing.assert_allclose(_numpy(logits), _numpy(fixed(images)), atol=0.1)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA through tf.function")
def test_xla_compiles_once_per_size():
    import tensorflow as tf

    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3))
    step = tf.function(lambda x: model(x, training=False), jit_compile=True)
    for size in [(32, 32), (48, 40), (32, 32)]:
        images = _images(size)
        np.testing.assert_allclose(step(images).numpy(), _numpy(model(images)), atol=1e-5)
    assert step.experimental_get_tracing_count() == 2
    # traced for any size (shapes unknown in the graph): the resampling is a conditional, the same numbers
    generic = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    for size in [(32, 32), (24, 40)]:
        np.testing.assert_allclose(generic(_images(size)).numpy(), _numpy(model(_images(size))), atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="exports run on TensorFlow")
@pytest.mark.parametrize("format", ["saved_model", "tflite", "onnx"])
def test_exports_keep_the_open_sides(format, tmp_path):
    from keras_vit import export

    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3))
    batches = [_images((32, 32), count=3), _images((24, 40), count=3, seed=1)]
    result = export.export(model, tmp_path / f"vit.{'tflite' if format == 'tflite' else format}", format=format,
                           images=batches)
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0  # both sizes, against Keras
    if format == "saved_model":
        import tensorflow as tf

        served = tf.saved_model.load(str(tmp_path / "vit.saved_model"))
        pixels = np.random.default_rng(2).integers(0, 256, (2, 26, 41, 3)).astype("uint8")  # not multiples of 4
        out = served.signatures["serve_pixels"](pixels=tf.constant(pixels))
        expected = model(tf.image.resize(tf.cast(pixels, tf.float32), (24, 40)) / 127.5 - 1.0)
        np.testing.assert_allclose(out["logits"].numpy(), _numpy(expected), atol=1e-4)
    if format == "tflite":
        interpreter = export.tflite_interpreter(tmp_path / "vit.tflite")
        assert list(interpreter.get_input_details()[0]["shape_signature"]) == [1, -1, -1, 3]
    if format == "onnx":
        import onnx

        dims = onnx.load(str(tmp_path / "vit.onnx")).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param != "" for d in dims] == [True, True, True, False]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="exports run on TensorFlow")
def test_the_export_check_of_a_padding_model_covers_sizes_that_pad():
    from keras_vit import export

    model = keras_vit.vision_transformer(image_size=(None, None), native_image_size=16, patch_size=4, hidden_size=12,
                                         num_layers=1, num_heads=3, mlp_dim=24, classes=3, dynamic_padding=True)
    sizes = [batch.shape[1:3] for batch in export._sample_batches(model, None)]
    assert (16, 16) in sizes and any(h % 4 and w % 4 for h, w in sizes)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="exports run on TensorFlow")
@pytest.mark.parametrize("format", ["onnx", "tflite"])
def test_a_padding_model_exports_right_at_sizes_that_pad(format, tmp_path):
    # ONNX's Mod of a negative size is not Python's (the padding was cut instead of added); TFLite needs the
    # channels of the padded images.
    from keras_vit import export

    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3),
                                               dynamic_padding=True)
    batches = [_images((33, 35)), _images((31, 32), seed=1), _images((5, 8), seed=2)]
    result = export.export(model, tmp_path / f"vit.{format}", format=format, images=batches)
    assert result["max_abs_diff"] < 1e-4
    assert export.export(model, tmp_path / f"default.{format}", format=format)["max_abs_diff"] < 1e-4


def test_a_model_of_any_size_resizes_and_its_file_interpolates(tmp_path):
    from keras_vit.cli import interpolate_main

    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), input_shape=(None, None, 3))
    images = _images((48, 32))
    fixed = keras_vit.resize_model(model, (48, 32))
    assert fixed.grid == (12, 8)
    np.testing.assert_allclose(_numpy(fixed(images)), _numpy(model(images)), atol=1e-5)
    still_open = keras_vit.resize_model(model, (None, None))
    np.testing.assert_allclose(_numpy(still_open(images)), _numpy(model(images)), atol=1e-6)
    model.save(tmp_path / "any.keras")
    assert interpolate_main([str(tmp_path / "any.keras"), str(tmp_path / "fixed.keras"), "--image-size", "48,32"]) == 0
    np.testing.assert_allclose(_numpy(keras.models.load_model(tmp_path / "fixed.keras")(images)), _numpy(model(images)),
                               atol=1e-5)
