"""Keras 3's own machinery on keras_vit models: quantization, LoRA, dtype policies in the saved file, weights by
variant, and files written by earlier versions."""

import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.arguments import ArgumentError
from conftest import REPO, fixture_path, load_reference

LEGACY = REPO / "tests" / "data" / "legacy_410d757"
SMALL = dict(image_size=16, patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, classes=5)
BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow export")


def _random_model(seed=0, **overrides):
    """A small model with random weights everywhere (the official init zeroes the head)."""
    model = keras_vit.vision_transformer(**{**SMALL, **overrides})
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "float" in str(variable.dtype):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model


def _images(seed=1, size=16, count=4):
    return np.random.default_rng(seed).uniform(-1, 1, (count, size, size, 3)).astype("float32")


def _run_in_fresh_process(script, tmp_path, **env):
    """Runs ``script`` in a new Python process (Keras' global dtype policy there is its default, float32)."""
    environment = os.environ | {"PYTHONPATH": str(REPO)} | env
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=tmp_path, env=environment)


def _quantized_layers(model):
    return [layer for layer in model._flatten_layers() if layer.quantization_mode is not None]


# --- quantization -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantize_reaches_every_projection(mode):
    model = _random_model(representation_size=24)
    images = _images()
    expected = keras.ops.convert_to_numpy(model(images))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not have a `quantize` method.*")
        model.quantize(mode)
    quantized = _quantized_layers(model)
    names = sorted(layer.name for layer in quantized)
    # per block query, key, value, out, Dense_0, Dense_1; then pre_logits and head
    assert names == sorted(["query", "key", "value", "out", "Dense_0", "Dense_1"] * 2 + ["pre_logits", "head"])
    assert {layer.quantization_mode for layer in quantized} == {mode}
    actual = keras.ops.convert_to_numpy(model(images))
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert 0 < error < {"int8": 0.05, "int4": 0.5, "float8": 0.2}[mode]


def test_quantize_reaches_the_hybrid_and_map_head_projections():
    hybrid = _random_model(image_size=32, patch_size=1, resnet_layers=(1,), resnet_width_factor=0.5, num_layers=1)
    hybrid.quantize("int8")
    assert len(_quantized_layers(hybrid)) == 6 + 1  # one block, the head; the ResNet's convolutions stay
    map_model = _random_model(classifier="map", num_layers=1)
    map_model.quantize("int8")
    assert len(_quantized_layers(map_model)) == 6 + 6 + 1  # block, MAP head (4 projections, its MLP), head


@pytest.mark.slow
def test_quantized_model_saves_and_reloads_in_a_fresh_process_with_identical_outputs(tmp_path):
    model = _random_model()
    model.quantize("int8")
    images = _images()
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", keras.ops.convert_to_numpy(model(images)))
    model.save(tmp_path / "q.keras")
    _run_in_fresh_process(
        """
        import keras, numpy as np, keras_vit  # keras_vit registers its classes
        model = keras.models.load_model("q.keras")  # safe_mode
        quantized = [layer for layer in model._flatten_layers() if layer.quantization_mode == "int8"]
        assert len(quantized) == 13, len(quantized)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(np.load("images.npy"))), np.load("expected.npy"))
        """,
        tmp_path,
    )


@pytest.mark.parametrize("mode", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_a_reloaded_quantized_model_saves_again_resizes_and_interpolates(mode, tmp_path):
    from keras_vit.cli import interpolate_main

    model = _random_model()
    model.quantize(mode)
    images = _images()
    expected = keras.ops.convert_to_numpy(model(images))
    model.save(tmp_path / "q.keras")
    reloaded = keras.models.load_model(tmp_path / "q.keras")
    assert reloaded.get_config()["dtype"] == model.get_config()["dtype"]  # a DTypePolicyMap of the quantized layers
    reloaded.save(tmp_path / "again.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.models.load_model(tmp_path / "again.keras")(images)),
                                  expected)
    resized = keras_vit.resize_model(reloaded, 16)  # the same size: the same codes
    assert {layer.quantization_mode for layer in _quantized_layers(resized)} == {mode}
    np.testing.assert_allclose(keras.ops.convert_to_numpy(resized(images)), expected, atol=1e-5)
    bigger = keras_vit.resize_model(reloaded, 24)
    assert bigger(_images(size=24)).shape == (4, 5)
    assert interpolate_main([str(tmp_path / "q.keras"), str(tmp_path / "q24.keras"), "--image-size", "24"]) == 0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.models.load_model(tmp_path / "q24.keras")(_images(size=24))),
                               keras.ops.convert_to_numpy(bigger(_images(size=24))), atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_the_weights_of_a_quantized_model_are_read_as_its_effective_float_weights(mode, tmp_path):
    from keras_vit.official_names import official_arrays

    model = _random_model()
    original = official_arrays(model)
    model.quantize(mode)
    arrays = official_arrays(model)  # never the integer codes
    step = {"int8": 1 / 127, "int4": 1 / 7}[mode]
    for name, array in arrays.items():
        bound = step * np.abs(original[name]).max() * 0.51 + 1e-6 if name.endswith("kernel") else 0
        assert np.abs(array - original[name]).max() <= bound, name
    model.save(tmp_path / "q.keras")
    rebuilt = keras_vit.from_official_checkpoint(tmp_path / "q.keras")  # a float model of those weights
    assert not _quantized_layers(rebuilt)
    for name, array in official_arrays(rebuilt).items():
        np.testing.assert_allclose(array, arrays[name], atol=1e-6, err_msg=name)


def test_load_weights_into_a_quantized_model_quantizes_the_loaded_weights():
    ref, _ = load_reference("vit_tiny_token")
    path = fixture_path("vit_tiny_token", "ckpt")
    quantized_after_loading = keras_vit.from_official_checkpoint(path)
    quantized_after_loading.quantize("int8")
    expected = keras.ops.convert_to_numpy(quantized_after_loading(ref["images"]))
    model = keras_vit.from_official_checkpoint(path)
    model.quantize("int8")
    for weight in model.weights:  # other weights, codes and scales in it before loading
        weight.assign(np.random.default_rng(0).normal(0, 1, weight.shape).astype(weight.dtype))
    keras_vit.load_weights(model, path)
    assert {layer.quantization_mode for layer in _quantized_layers(model)} == {"int8"}
    actual = keras.ops.convert_to_numpy(model(ref["images"]))
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    assert np.abs(actual - ref["logits"]).max() < 0.1  # int8's own error against the official logits


@pytest.mark.slow
@tensorflow_only
def test_quantized_model_exports_with_keras_and_the_project_exporter(tmp_path):
    import tensorflow as tf

    from keras_vit import export

    model = _random_model()
    model.quantize("int8")
    images = _images()
    expected = keras.ops.convert_to_numpy(model(images))
    model.export(str(tmp_path / "keras_export"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "keras_export"))  # kept: its variables live as long as it does
    served = reloaded.serve(images).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    result = export.export(model, tmp_path / "vit.tflite", format="tflite", images=images)
    assert result["quantization"] == "int8"  # TFLite's own int8 of the layers' effective weights
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 0.05 * np.abs(expected).max()
    model.save(tmp_path / "q.keras")  # a reloaded quantized model exports too
    saved = export.export(keras.models.load_model(tmp_path / "q.keras"), tmp_path / "served", format="saved_model",
                          images=images)
    assert saved["max_abs_diff"] < 1e-4  # Keras' quantized computation itself


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_enable_lora_trains_only_the_low_rank_factors_and_the_head():
    model = _random_model()
    images = _images()
    before = keras.ops.convert_to_numpy(model(images))
    model.enable_lora(4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)), before, atol=1e-6)  # unchanged at first
    trainable = sorted(v.path for v in model.trainable_variables)
    lora = [p for p in trainable if "lora" in p]
    assert len(lora) == 2 * 2 * 2  # (query, value) x 2 blocks x (A, B)
    assert all(("/query/" in p or "/value/" in p) for p in lora)
    assert sorted(set(trainable) - set(lora)) == ["head/bias", "head/kernel"]
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert params == 2 * 2 * (48 * 3 * 4 + 4 * 16) + 48 * 5 + 5  # Keras' EinsumDense factors: (D, N, r), (r, dh)

    frozen = {v.path: keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    labels = keras.utils.to_categorical(np.arange(4) % 5, 5)
    model.fit(images, labels, epochs=3, verbose=0)
    for variable in model.non_trainable_variables:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), frozen[variable.path])
    assert np.abs(keras.ops.convert_to_numpy(model(images)) - before).max() > 1e-3


def test_lora_weights_save_and_load_into_a_model_with_the_same_base(tmp_path):
    base = _random_model(seed=3)
    base.save(tmp_path / "base.keras")
    model = keras.models.load_model(tmp_path / "base.keras")
    model.enable_lora(2, target_names=("query", "value", "Dense_0"))
    for variable in model.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.05, "float32"))
    images = _images()
    expected = keras.ops.convert_to_numpy(model(images))
    model.save_lora_weights(tmp_path / "adapter.lora.h5")
    fresh = keras.models.load_model(tmp_path / "base.keras")
    fresh.load_lora_weights(tmp_path / "adapter.lora.h5")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(images)), expected, atol=1e-6)
    model.save(tmp_path / "merged.keras")  # Keras merges the factors into the kernels
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.models.load_model(tmp_path / "merged.keras")(images)), expected, atol=1e-5
    )
    with pytest.raises(ArgumentError) as error:
        model.save_lora_weights(tmp_path / "adapter.h5")
    assert (error.value.name, error.value.value) == ("path", str(tmp_path / "adapter.h5"))
    with pytest.raises(ArgumentError) as error:
        model.enable_lora(0)
    assert (error.value.name, error.value.value) == ("rank", 0)


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantizing_a_lora_model_merges_its_factors_first_and_reloads_identically(mode, tmp_path):
    model = _random_model()
    model.enable_lora(2)
    for variable in model.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.05, "float32"))  # trained factors
    images = _images()
    adapted = keras.ops.convert_to_numpy(model(images))
    model.quantize(mode)
    assert not any(getattr(layer, "lora_enabled", False) for layer in model._flatten_layers())
    quantized = keras.ops.convert_to_numpy(model(images))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(images)), quantized)  # float8: every call runs
    error = np.abs(quantized - adapted).max() / np.abs(adapted).max()
    assert error < {"int8": 0.05, "int4": 0.5, "float8": 0.2}[mode]  # the merged kernels, quantized
    model.save(tmp_path / "q.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.models.load_model(tmp_path / "q.keras")(images)),
                                  quantized)


def test_enable_lora_refuses_a_rank_or_target_it_cannot_use_and_changes_nothing():
    model = _random_model()
    for rank, expected in ((True, "a positive int"), (0, "a positive int"), (2.0, "a positive int"),
                           (17, "at most 16")):  # 17: above the head size 16, the rank of a query update
        with pytest.raises(ArgumentError) as error:
            model.enable_lora(rank)
        assert (error.value.name, error.value.value, error.value.expected) == ("rank", rank, expected)
    with pytest.raises(ArgumentError) as error:
        model.enable_lora(2, target_names=("query", "valeu"))
    assert (error.value.name, error.value.value) == ("target_names", ["valeu"])
    assert not hasattr(model, "_lora") and len(model.trainable_variables) == len(model.weights)
    model.enable_lora(16, target_names="query")  # one name as a string; rank up to the head size
    assert {path.split("/")[-1] for path in model._lora["paths"]} == {"query"}
    with pytest.raises(ValueError):
        model.enable_lora(2, target_names="query")  # once per model


def test_a_refused_lora_file_leaves_the_model_as_it_was(tmp_path):
    trained = _random_model(seed=3)
    trained.enable_lora(2)
    trained.save_lora_weights(tmp_path / "adapter.lora.h5")
    other_base = _random_model(seed=4)
    with pytest.raises(keras_vit.CheckpointMismatchError, match="another base") as caught:
        other_base.load_lora_weights(tmp_path / "adapter.lora.h5")
    assert caught.value.missing == caught.value.unexpected == caught.value.mis_shaped == []
    assert not any(getattr(layer, "lora_enabled", False) for layer in other_base._flatten_layers())
    assert len(other_base.trainable_variables) == len(other_base.weights)  # nothing frozen
    wider = _random_model(hidden_size=96)
    with pytest.raises(keras_vit.CheckpointMismatchError) as caught:
        wider.load_lora_weights(tmp_path / "adapter.lora.h5")
    assert caught.value.mis_shaped[0][1:] == ((48, 3, 2), (96, 3, 2))
    assert not any(getattr(layer, "lora_enabled", False) for layer in wider._flatten_layers())
    deeper = _random_model(seed=3, num_layers=3)
    deeper.enable_lora(2)
    with pytest.raises(keras_vit.CheckpointMismatchError) as caught:
        deeper.load_lora_weights(tmp_path / "adapter.lora.h5")
    assert [name.split("/")[0] for name in caught.value.missing] == ["encoderblock_2"] * 4


# --- dtype policies -----------------------------------------------------------------------------------------------


def test_dtype_argument_reaches_every_layer_and_the_config():
    model = keras_vit.create_model("Ti/16", image_size=32, num_layers=1, classes=3, dtype="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched
    assert model.get_config()["dtype"] == "mixed_bfloat16"
    for layer in model._flatten_layers(include_self=False):
        if layer.name != "head" and layer.weights:
            assert layer.compute_dtype == "bfloat16", layer.path
    assert model.get_layer("head").compute_dtype == "float32"
    assert keras.backend.standardize_dtype(model(_images(size=32)).dtype) == "float32"


def test_a_mixed_float16_model_is_compiled_with_loss_scaling():
    model = _random_model(dtype="mixed_float16")
    assert model.dtype_policy.name == "mixed_float16" and model.compute_dtype == "float16"
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras' compile reads the model's policy
    assert keras_vit.vision_transformer(**SMALL, dtype="mixed_bfloat16").dtype_policy.name == "mixed_bfloat16"


def test_a_quantized_dtype_is_refused_before_anything_is_built():
    with pytest.raises(ArgumentError) as error:
        keras_vit.vision_transformer(**SMALL, dtype="int8_from_float32")
    assert (error.value.name, error.value.value) == ("dtype", "int8_from_float32")
    assert "model.quantize('int8')" in str(error.value)  # the one message test: it names the way to a quantized model


@pytest.mark.slow
def test_mixed_precision_model_reloads_mixed_in_a_fresh_float32_process(tmp_path):
    model = _random_model(dtype="mixed_bfloat16")
    images = _images()
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", keras.ops.convert_to_numpy(model(images)))
    model.save(tmp_path / "mixed.keras")
    _run_in_fresh_process(
        """
        import keras, numpy as np, keras_vit  # keras_vit registers its classes
        assert keras.config.dtype_policy().name == "float32"
        model = keras.models.load_model("mixed.keras")
        assert model.get_layer("encoderblock_0").compute_dtype == "bfloat16"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(np.load("images.npy"))), np.load("expected.npy"))
        """,
        tmp_path,
    )


def test_from_official_checkpoint_takes_a_dtype():
    ref, _ = load_reference("vit_tiny_token")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"), dtype="mixed_bfloat16")
    assert model.get_layer("encoderblock_0").compute_dtype == "bfloat16"
    np.testing.assert_allclose(model.predict(ref["images"], verbose=0), ref["logits"], atol=0.05)


# --- weights by variant -------------------------------------------------------------------------------------------


class _Fetched(Exception):
    pass


def test_weights_families_resolve_from_the_variant_not_the_name(monkeypatch):
    from keras_vit.pretrained import download

    def fetch(url, sha256=None):
        raise _Fetched(url)

    monkeypatch.setattr(download, "fetch", fetch)
    renamed = keras_vit.ViT_Ti16(name="my_vit", image_size=32, num_layers=12)
    assert renamed.vit_config["variant"] == "ViT-Ti_16"
    with pytest.raises(_Fetched, match="augreg/Ti_16-i21k"):
        keras_vit.load_weights(renamed, "augreg_in21k")
    built = keras_vit.vision_transformer(image_size=32, patch_size=16, hidden_size=192, num_layers=12, num_heads=3,
                                         mlp_dim=768, name="built")
    assert built.vit_config["variant"] == "ViT-Ti_16"
    with pytest.raises(_Fetched, match="augreg/Ti_16-i21k"):
        keras_vit.load_weights(built, "augreg_in21k")
    custom = keras_vit.vision_transformer(**SMALL)
    assert custom.vit_config["variant"] is None
    with pytest.raises(ValueError, match="official variant"):
        keras_vit.load_weights(custom, "augreg_in21k")
    with pytest.raises(ValueError, match="does not describe this geometry"):
        keras_vit.vision_transformer(**SMALL, variant="ViT-B_16")


# --- files written by earlier versions (tests/data/legacy_410d757, made by its make_legacy.py) ----------------------


@pytest.mark.parametrize("name", ["token_dropout", "gap_bf16", "hybrid"])
def test_keras_files_written_at_410d757_load_with_identical_outputs(name):
    outputs = np.load(LEGACY / "outputs.npz")
    model = keras.models.load_model(LEGACY / f"{name}.keras")
    images = outputs["hybrid_images" if name == "hybrid" else "images"]
    actual = keras.ops.convert_to_numpy(model(images, training=False)).astype("float32")
    # 410d757 stored no dtype: its files compute under the loading process's policy, as they did then.
    np.testing.assert_allclose(actual, outputs[f"{name}_reloaded"], atol=1e-5, rtol=1e-5)
    assert isinstance(model, keras_vit.VisionTransformer)
    assert model.get_layer("encoderblock_0").attention.query.kernel.shape[1:] == (3, 16)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantized_copy_holds_the_effective_weights_of_a_quantized_model(mode):
    from keras_vit.backbone import dequantized_copy

    model = _random_model()
    original = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    model.quantize(mode)
    twin = dequantized_copy(model)
    assert not _quantized_layers(twin)
    step = {"int8": 1 / 127, "int4": 1 / 7}[mode]  # absmax quantization: error <= half a step of the row's max
    for variable in twin.weights:
        value, before = keras.ops.convert_to_numpy(variable), original[variable.path]
        if variable.path.endswith("/kernel") and "embedding" not in variable.path:
            assert np.abs(value - before).max() <= step * np.abs(before).max() * 0.51 + 1e-6, variable.path
        else:
            np.testing.assert_array_equal(value, before)


def test_a_training_checkpoint_written_at_410d757_restores_with_identical_outputs():
    from keras_vit.train import checkpointing

    outputs = np.load(LEGACY / "outputs.npz")
    model = keras.models.load_model(LEGACY / "token_dropout.keras")  # the architecture; its weights get replaced
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
    optimizer.build(model.trainable_variables)
    state = checkpointing.CheckpointManager(LEGACY / "ckpt").restore(model, optimizer, run_id="legacy")
    assert state["step"] == 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(outputs["images"], training=False)),
                               outputs["ckpt_logits"], atol=1e-5)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2


# --- files written by d3246bf (tests/data/main_d3246bf, made by its make_main.py) -----------------------------------

MAIN = REPO / "tests" / "data" / "main_d3246bf"
# Written on TensorFlow: the same backend reproduces them to float32 rounding, the others to 1e-5 (other kernels).
SAME = 1e-6 if keras.backend.backend() == "tensorflow" else 1e-5


@pytest.mark.parametrize("name", ["plain", "int8", "lora", "map_reg_sincos"])
def test_keras_files_written_at_d3246bf_load_with_identical_outputs_and_configs(name):
    import json

    outputs = np.load(MAIN / "outputs.npz")
    model = keras.models.load_model(MAIN / f"{name}.keras")
    actual = keras.ops.convert_to_numpy(model(outputs["images"], training=False)).astype("float32")
    np.testing.assert_allclose(actual, outputs[name], atol=SAME, rtol=SAME)
    written = json.loads((MAIN / "configs.json").read_text())[name]
    config = json.loads(json.dumps(model.get_config()))
    assert {key: config.get(key) for key in written} == written
    # arguments declared after d3246bf (the timm options) read back at their declared defaults
    defaults = inspect.signature(keras_vit.VisionTransformer).parameters
    added = {key: value for key, value in config.items() if key not in written}
    assert added == {key: json.loads(json.dumps(defaults[key].default)) for key in added}


def test_lora_factors_written_at_d3246bf_load_onto_their_base_with_identical_outputs():
    outputs = np.load(MAIN / "outputs.npz")
    model = keras.models.load_model(MAIN / "plain.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(outputs["images"])), outputs["lora_base"], atol=SAME)
    model.load_lora_weights(MAIN / "lora.lora.h5")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(outputs["images"])), outputs["lora"], atol=1e-5)


def test_a_training_checkpoint_written_at_d3246bf_restores_with_identical_outputs():
    from keras_vit.train import checkpointing

    outputs = np.load(MAIN / "outputs.npz")
    model = keras.models.load_model(MAIN / "plain.keras")
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
    optimizer.build(model.trainable_variables)
    state = checkpointing.CheckpointManager(MAIN / "ckpt").restore(model, optimizer, run_id="main")
    assert state["step"] == 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(outputs["images"], training=False)),
                               outputs["ckpt_logits"], atol=SAME)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2
