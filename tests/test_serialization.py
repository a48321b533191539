"""Saving and reloading (.keras with safe_mode, SavedModel, .weights.h5) and mixed precision."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_vit
from conftest import REPO, builder_kwargs, fixture_path, load_reference


def _fixture_model(name="vit_tiny_repr", **overrides):
    ref, config = load_reference(name)
    model = keras_vit.vision_transformer(**builder_kwargs(config) | overrides)
    keras_vit.load_weights(model, fixture_path(name, "ckpt"), adapt=False)
    return model, ref


def _regularised_model():
    """A model whose config uses every option, so a reload must restore all of them."""
    return keras_vit.vision_transformer(
        image_size=(16, 24), patch_size=(4, 8), hidden_size=12, num_layers=2, num_heads=3, mlp_dim=20,
        representation_size=6, classes=4, classifier_activation="softmax", dropout_rate=0.1,
        attention_dropout_rate=0.1, stochastic_depth_rate=0.2, gelu="erf", channels=2,
    )


def test_keras_file_reloads_in_safe_mode(tmp_path):
    model, ref = _fixture_model()
    path = tmp_path / "vit.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)  # safe_mode=True by default: would refuse a Lambda layer
    np.testing.assert_array_equal(reloaded.predict(ref["images"], verbose=0), model.predict(ref["images"], verbose=0))
    np.testing.assert_allclose(reloaded.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    options = _regularised_model()
    options.save(tmp_path / "options.keras")
    as_json = lambda m: json.loads(json.dumps(m.get_config()))  # noqa: E731  (tuples become lists)
    assert as_json(keras.models.load_model(tmp_path / "options.keras")) == as_json(options)


@pytest.mark.slow
def test_keras_file_reloads_in_a_fresh_process(tmp_path):
    model, ref = _fixture_model("vit_tiny_gap")
    model.save(tmp_path / "vit.keras")
    np.save(tmp_path / "images.npy", ref["images"])
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, keras_vit
        model = keras.models.load_model({str(tmp_path / "vit.keras")!r})
        np.save({str(tmp_path / "out.npy")!r}, model.predict(np.load({str(tmp_path / "images.npy")!r}), verbose=0))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO)})
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref["logits"], atol=1e-5)


def test_weights_h5_round_trip(tmp_path):
    model, ref = _fixture_model()
    model.save_weights(tmp_path / "vit.weights.h5")
    _, config = load_reference("vit_tiny_repr")
    fresh = keras_vit.vision_transformer(**builder_kwargs(config))
    keras_vit.load_weights(fresh, tmp_path / "vit.weights.h5")
    np.testing.assert_allclose(fresh.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel export needs the TensorFlow backend")
def test_saved_model_export_reloads_with_tensorflow(tmp_path):
    import tensorflow as tf

    model, ref = _fixture_model()
    model.export(str(tmp_path / "saved_model"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(reloaded.serve(ref["images"]).numpy(), ref["logits"], atol=1e-5)


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("policy, atol", [("mixed_bfloat16", 0.05), ("mixed_float16", 0.01)], indirect=["policy"])
def test_mixed_precision(policy, atol, tmp_path):
    model, ref = _fixture_model()
    assert all(v.dtype == "float32" for v in model.weights)
    block = model.get_layer("encoderblock_0")
    assert block.compute_dtype == policy.split("_")[1]
    assert model.get_layer("encoder_norm").compute_dtype == policy.split("_")[1]
    logits = model.predict(ref["images"], verbose=0)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref["logits"], atol=atol)
    assert np.abs(logits - ref["logits"]).max() > 1e-6  # really computed in half precision
    tokens = keras.ops.cast(ref["tokens_with_posemb"], policy.split("_")[1])
    _, weights = block(tokens, return_attention_scores=True)
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"  # softmax in float32
    model.save(tmp_path / "mixed.keras")
    reloaded = keras.models.load_model(tmp_path / "mixed.keras")
    np.testing.assert_array_equal(reloaded.predict(ref["images"], verbose=0), logits)
