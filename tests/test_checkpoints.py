"""Official .npz loading against the golden fixtures of the official JAX code."""

import zipfile

import keras
import numpy as np
import pytest

import keras_vit
from conftest import PLAIN_FIXTURES, builder_kwargs, fixture_path, load_reference
from keras_vit.pretrained import npz


def _intermediate_model(model, config):
    outputs = {
        "logits": model.output,
        "tokens_with_posemb": model.get_layer("posembed_input").output,
        "encoded": model.get_layer("encoder_norm").output,
    }
    for i in range(config["transformer"]["num_layers"]):
        outputs[f"encoderblock_{i}_out"] = model.get_layer(f"encoderblock_{i}").output
    return keras.Model(model.input, outputs)


@pytest.fixture
def save_npz(tmp_path):
    """Returns a function that writes ``{name: array}`` to a new .npz in tmp_path and returns its path."""
    counter = iter(range(1000))

    def save(arrays):
        path = tmp_path / f"checkpoint_{next(counter)}.npz"
        np.savez(path, **arrays)
        return path

    return save


@pytest.mark.parametrize("name", PLAIN_FIXTURES)
def test_fixture_reproduced(name, save_npz):
    ref, config = load_reference(name)
    model = keras_vit.vision_transformer(**builder_kwargs(config))
    keras_vit.load_weights(model, fixture_path(name, "ckpt"), adapt=False)
    outputs = _intermediate_model(model, config).predict(ref["images"], verbose=0)
    np.testing.assert_allclose(outputs["logits"], ref["logits"], atol=1e-5, rtol=0)
    for key in outputs:
        np.testing.assert_allclose(outputs[key], ref[key], atol=5e-5, rtol=0, err_msg=key)
    # Without the head: pooled (and pre-logits) features equal the official pre_logits.
    features = keras_vit.vision_transformer(**builder_kwargs(config) | dict(include_top=False, pooling=config["classifier"]))
    arrays = npz.read_npz(fixture_path(name, "ckpt"))
    keras_vit.load_weights(features, save_npz({k: v for k, v in arrays.items() if not k.startswith("head/")}), adapt=False)
    np.testing.assert_allclose(features.predict(ref["images"], verbose=0), ref["pre_logits"], atol=1e-5, rtol=0)


def _tiny_token_model():
    ref, config = load_reference("vit_tiny_token")
    return keras_vit.vision_transformer(**builder_kwargs(config)), ref


def test_linen_names_and_prefixes_load_identically(save_npz):
    model, ref = _tiny_token_model()
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    linen = {}
    for key, value in arrays.items():
        for old, new in renames.items():
            key = key.replace(f"/{old}/", f"/{new}/")
        linen[f"params/{key}"] = value
    assert any("MlpBlock_0" in k for k in linen)
    keras_vit.load_weights(model, save_npz(linen), adapt=False)
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
    keras_vit.load_weights(model, save_npz({f"opt/target/{k}": v for k, v in arrays.items()}), adapt=False)
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)


def _assert_untouched(model, before):
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.pop("Transformer/encoderblock_1/LayerNorm_2/scale"), r"Missing from the checkpoint \(1\): Transformer/encoderblock_1/LayerNorm_2/scale"),
        (lambda a: a.update({"pre_logits/kernel": np.zeros((48, 48), "float32")}), r"Not used by the model \(1\): pre_logits/kernel"),
        (lambda a: a.update({"head/kernel": np.zeros((48, 11), "float32")}), r"head/kernel: \(48, 11\) vs \(48, 10\)"),
    ],
    ids=["missing", "extra", "mis-shaped"],
)
def test_mismatched_checkpoint_is_a_clear_error_and_assigns_nothing(edit, message, save_npz):
    model, _ = _tiny_token_model()
    before = model.get_weights()
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    edit(arrays)
    with pytest.raises(keras_vit.CheckpointMismatchError, match=message):
        keras_vit.load_weights(model, save_npz(arrays), adapt=False)
    _assert_untouched(model, before)


def test_checkpoint_of_another_resolution_is_rejected():
    model, _ = _tiny_token_model()
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"pos_embedding: \(1, 145, 48\) vs \(1, 65, 48\)"):
        keras_vit.load_weights(model, fixture_path("vit_tiny_token_posemb48", "ckpt"), adapt=False)


def test_pickled_array_is_refused(tmp_path):
    model, _ = _tiny_token_model()
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    arrays["cls"] = np.array([{"payload": 1}], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="pickled Python objects"):
        keras_vit.load_weights(model, path, adapt=False)


def test_truncated_and_missing_files(tmp_path):
    model, _ = _tiny_token_model()
    data = fixture_path("vit_tiny_token", "ckpt").read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        keras_vit.load_weights(model, truncated, adapt=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keras_vit.load_weights(model, tmp_path / "absent.npz", adapt=False)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"not an .npz checkpoint \(a single .npy array"):
        keras_vit.load_weights(model, tmp_path / "single.npy", adapt=False)
    (tmp_path / "page.npz").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="not a zip archive"):
        keras_vit.load_weights(model, tmp_path / "page.npz", adapt=False)
    assert zipfile.is_zipfile(fixture_path("vit_tiny_token", "ckpt"))


def test_weights_argument_takes_a_checkpoint_path():
    ref, config = load_reference("vit_tiny_repr")
    kwargs = builder_kwargs(config)
    model = keras_vit.create_model(
        "Ti/16", weights=fixture_path("vit_tiny_repr", "ckpt"), image_size=kwargs["image_size"], classes=21,
        patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, representation_size=48,
    )
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=1e-5)
