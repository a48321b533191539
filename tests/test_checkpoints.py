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
    "edit, expected",
    [
        (lambda a: a.pop("Transformer/encoderblock_1/LayerNorm_2/scale"),
         (["Transformer/encoderblock_1/LayerNorm_2/scale"], [], [])),
        (lambda a: a.update({"pre_logits/kernel": np.zeros((48, 48), "float32")}), ([], ["pre_logits/kernel"], [])),
        (lambda a: a.update({"head/kernel": np.zeros((48, 11), "float32"), "head/bias": np.zeros(11, "float32")}),
         ([], [], [("head/bias", (11,), (10,)), ("head/kernel", (48, 11), (48, 10))])),
    ],
    ids=["missing", "extra", "mis-shaped"],
)
def test_mismatched_checkpoint_is_a_clear_error_and_assigns_nothing(edit, expected, save_npz):
    model, _ = _tiny_token_model()
    before = model.get_weights()
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    edit(arrays)
    with pytest.raises(keras_vit.CheckpointMismatchError) as error:
        keras_vit.load_weights(model, save_npz(arrays), adapt=False)
    assert (error.value.missing, error.value.unexpected, error.value.mis_shaped) == expected
    _assert_untouched(model, before)


def test_checkpoint_of_another_resolution_is_rejected():
    model, _ = _tiny_token_model()
    with pytest.raises(keras_vit.CheckpointMismatchError) as error:
        keras_vit.load_weights(model, fixture_path("vit_tiny_token_posemb48", "ckpt"), adapt=False)
    assert error.value.mis_shaped == [("Transformer/posembed_input/pos_embedding", (1, 145, 48), (1, 65, 48))]
    assert (error.value.missing, error.value.unexpected) == ([], [])


def test_a_checkpoint_mismatch_message_says_the_file_the_counts_a_few_names_and_what_to_do():
    # the one message-text test of CheckpointMismatchError; the other tests read its fields
    error = keras_vit.CheckpointMismatchError("w.npz", missing=[f"m{i}" for i in range(7)], unexpected=["u"],
                                              mis_shaped=[("s", (1,), (2,))], summary="a ViT-Ti/16", advice="Do this.")
    assert str(error) == (
        "Checkpoint w.npz does not match the model: a ViT-Ti/16.\n"
        "Missing from the checkpoint (7): m0, m1, m2, m3, m4, ... (2 more)\n"
        "Not used by the model (1): u\n"
        "Shape mismatch (1), name: checkpoint vs model: s: (1,) vs (2,)\n"
        "Do this.")
    assert (error.source, error.summary, error.advice) == ("w.npz", "a ViT-Ti/16", "Do this.")


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


# --- bad files: refused from their headers, before anything large is allocated ------------------------------------


def _npz_member(archive, name, shape, chunks, compression=zipfile.ZIP_DEFLATED):
    """Writes member ``name.npy`` declaring float32 ``shape``, its data the byte strings ``chunks``."""
    info = zipfile.ZipInfo(f"{name}.npy")
    info.compress_type = compression
    with archive.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for chunk in chunks:
            member.write(chunk)


def _peak_allocation(call):
    """Peak traced allocation (bytes) while ``call()`` runs (NumPy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_small_file_that_decompresses_to_a_huge_array_is_refused_unread(tmp_path):
    bomb = tmp_path / "bomb.npz"
    chunk, total = 16 << 20, 1_600_000 * 48 * 4  # 307.2 MB of float32 zeros
    zeros = (bytes(min(chunk, total - start)) for start in range(0, total, chunk))
    with zipfile.ZipFile(bomb, "w") as archive:
        _npz_member(archive, "Transformer/posembed_input/pos_embedding", (1, 1_600_000, 48), zeros)
    assert bomb.stat().st_size < 1_000_000

    def load():
        with pytest.raises(ValueError, match=r"bomb.npz is a \d+\.\d kB file whose arrays would take 307.2 MB .*so it was not read"):
            keras_vit.from_official_checkpoint(bomb)

    assert _peak_allocation(load) < 20_000_000


def test_an_array_header_larger_than_its_data_is_refused_unread(tmp_path):
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as archive:
        _npz_member(archive, "cls", (1, 1 << 28, 1), [bytes(400)], zipfile.ZIP_STORED)

    def load():
        with pytest.raises(ValueError, match=r"array 'cls' declares shape \(1, 268435456, 1\) float32 \(1.1 GB\) but the archive holds 400 bytes"):
            npz.read_npz(liar)

    assert _peak_allocation(load) < 20_000_000


def test_a_checkpoint_far_larger_than_the_model_is_refused_unread(tmp_path, monkeypatch):
    from keras_vit.pretrained import load, names

    big = tmp_path / "b16.npz"
    arrays = keras_vit.official_names.official_arrays(keras_vit.create_model("B/16", num_layers=1, image_size=32))
    np.savez(big, **arrays)
    model, _ = _tiny_token_model()
    values, weights = sum(a.size for a in arrays.values()), model.count_params()
    monkeypatch.setattr(load, "READ_ANYWAY_BYTES", 1 << 20)  # the rule at a small scale: a 34 MB file, a 0.2 MB model
    message = (
        rf"this is a ViT-B/16 token, 1 layers checkpoint; the model is ViT-D48-N3-M96/4 token, 2 layers; its arrays hold "
        rf"{values:,} values, {values / weights:.0f} times the model's {weights:,} weights, so it was not read"
    )

    def load_big():
        with pytest.raises(keras_vit.CheckpointMismatchError, match=message):
            keras_vit.load_weights(model, big)

    assert _peak_allocation(load_big) < 5_000_000


def test_the_released_layouts_pass_the_consistency_check():
    from conftest import FIXTURES
    from keras_vit.pretrained import checks

    files = sorted(FIXTURES.glob("*.ckpt.npz")) + sorted((FIXTURES.parent / "big_vision_vit").glob("*.ckpt.npz"))
    assert len(files) >= 8
    for path in files:
        checks.check_consistent({name: header.shape for name, header in npz.array_headers(path).items()}, path)


@pytest.mark.parametrize(
    "name, shape",
    [("Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias", (95,)), ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", (48, 95)),
     ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel", (48, 4, 12))],
)
def test_one_wrong_shaped_array_is_the_one_named(name, shape, save_npz):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    expected = arrays[name].shape
    arrays[name] = np.zeros(shape, "float32")
    with pytest.raises(ValueError) as raised:
        keras_vit.from_official_checkpoint(save_npz(arrays))
    message = str(raised.value)
    assert f"its arrays disagree with each other: the others describe a ViT with " in message
    assert f"which needs '{name}' shaped {expected} (it is {shape}). The file was damaged or edited" in message
    assert message.count("Transformer/") == 1 and "from_official_checkpoint" not in message and "\n" not in message


def test_nonfinite_values_are_refused_unless_allowed(save_npz):
    import ml_dtypes

    model, ref = _tiny_token_model()
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    arrays["head/bias"] = arrays["head/bias"].copy()
    arrays["head/bias"][[1, 4]] = [np.nan, np.inf]
    kernel = arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"].astype(ml_dtypes.bfloat16)
    kernel[0, 0] = -np.inf
    arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"] = kernel.view(np.uint16)  # bfloat16 bit patterns
    path = save_npz(arrays)
    with pytest.raises(ValueError, match=r"2 array\(s\) hold NaN or infinite values: 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel' \(1 of 4608 values\), 'head/bias' \(2 of 10 values\); .*keras_vit.load_weights\(model, path, allow_nonfinite=True\)"):
        keras_vit.from_official_checkpoint(path)
    before = model.get_weights()
    with pytest.raises(ValueError, match="NaN or infinite"):
        keras_vit.load_weights(model, path)
    _assert_untouched(model, before)
    keras_vit.load_weights(model, path, allow_nonfinite=True)
    bias = keras.ops.convert_to_numpy(model.get_layer("head").bias)
    assert np.isnan(bias[1]) and bias[4] == np.inf and np.isnan(model.predict(ref["images"], verbose=0)).all()


def test_a_legacy_keras_h5_file_is_named_as_such(tmp_path):
    legacy = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    legacy.save(tmp_path / "model.h5")
    with pytest.raises(ValueError) as raised:
        keras_vit.from_official_checkpoint(tmp_path / "model.h5")
    message = str(raised.value)
    assert "model.h5 is an HDF5 file (a legacy Keras .h5 model or weights file), not an official .npz checkpoint" in message
    assert "keras.models.load_model" in message and "truncated" not in message and "corrupt" not in message


def test_a_foreign_weights_h5_file_is_a_checkpoint_mismatch(tmp_path):
    model, _ = _tiny_token_model()
    before = model.get_weights()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(keras_vit.CheckpointMismatchError, match=r"other.weights.h5 does not match the model: its weights are not those of this model's architecture \(Keras: Layer '.*' expected 2 variables"):
        keras_vit.load_weights(model, tmp_path / "other.weights.h5")
    _assert_untouched(model, before)


def test_compressed_big_endian_and_fortran_order_archives_read_as_numpy_reads_them(tmp_path):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.asfortranarray(arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"])
    arrays["head/kernel"] = arrays["head/kernel"].astype(">f4")
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        with np.load(path) as reference:
            read = npz.read_npz(path)
            assert sorted(read) == sorted(reference.files)
            for name in reference.files:
                assert read[name].dtype == reference[name].dtype and read[name].flags.f_contiguous == reference[name].flags.f_contiguous
                np.testing.assert_array_equal(read[name], reference[name], err_msg=name)


def test_a_flipped_bit_in_an_array_is_caught_by_its_crc(tmp_path):
    source = fixture_path("vit_tiny_token", "ckpt")
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo("Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel.npy")
    data = bytearray(source.read_bytes())
    data[info.header_offset + info.compress_size] ^= 0x10  # a byte in the array's data (past the local header)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"array 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel' is corrupt \(truncated, or its CRC does not match\)"):
        keras_vit.from_official_checkpoint(damaged)


def test_an_array_no_vit_has_is_refused_from_its_header(save_npz):
    arrays = npz.read_npz(fixture_path("vit_tiny_token", "ckpt"))
    arrays["cls"] = np.zeros((1, 1, 1, 1, 48), "float32")
    with pytest.raises(ValueError, match=r"array 'cls' is shaped \(1, 1, 1, 1, 48\) with dtype float32; a ViT checkpoint holds plain numeric arrays of at most 4 dimensions"):
        keras_vit.from_official_checkpoint(save_npz(arrays))
