"""Training checkpoints: keyed by variable path, every variable (dropout seed states too), atomic, rotated, checked."""

import hashlib
import json
import logging

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.train import checkpointing

IMAGES = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype("float32")


def _model(seed=1, **overrides):
    keras.utils.set_random_seed(seed)
    options = dict(classes=3, channels=1, dropout_rate=0.5) | overrides
    return keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, **options)


def _trained(seed=1, steps=2, **overrides):
    """A model and an EMA Adam optimizer after ``steps`` updates (so every slot and seed state has moved)."""
    model = _model(seed, **overrides)
    optimizer = keras.optimizers.Adam(0.01, use_ema=True)
    optimizer.build(model.trainable_variables)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = keras.ops.sum(model(IMAGES, training=True) ** 2)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return model, optimizer


def _values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def test_stock_checkpoint_formats_miss_variables_ours_carries(tmp_path):
    """Why checkpointing is ours (Keras 3.15, TF 2.21): the stock formats lose the model or its seed states."""
    model, optimizer = _trained()
    seeds = [v.path for v in model.variables if "seed_generator" in v.path]
    assert seeds  # dropout keeps its RNG state in seed-generator variables
    names = [name for name, _ in tf.train.list_variables(tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "tf")))]
    assert not any(name.startswith("model/") for name in names)  # the model's own variables are not there
    assert not any("seed" in name for name in names)
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5") as file:
        stored = []
        file.visititems(lambda name, item: stored.append(item) if isinstance(item, h5py.Dataset) else None)
    assert len(stored) == len(model.trainable_variables) < len(model.variables)  # the seed states are left out

    manager = checkpointing.CheckpointManager(tmp_path / "ours")
    manager.save(model, optimizer, step=2, stream_position=2)
    model_values, optimizer_values = _values(model.variables), _values(optimizer.variables)
    masks = keras.ops.convert_to_numpy(model(IMAGES, training=True))  # draws from the seed states
    fresh, fresh_optimizer = _trained(seed=7, steps=1)
    state = manager.restore(fresh, fresh_optimizer)
    assert state["step"] == 2 and state["stream_position"] == 2
    # the fresh model and optimizer were made second in this process: Keras numbered their seed generators and
    # optimizer otherwise (seed_generator_2, adam_1); they load all the same
    assert fresh_optimizer.name != optimizer.name
    for expected, restored in ((model_values, _values(fresh.variables)), (optimizer_values, _values(fresh_optimizer.variables))):
        assert len(expected) == len(restored)
        for index, (a, b) in enumerate(zip(expected, restored)):
            np.testing.assert_array_equal(b, a, err_msg=str(index))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(IMAGES, training=True)), masks)  # same dropout


def test_last_n_kept_written_atomically_listed_like_tf_checkpoint_manager(tmp_path, monkeypatch):
    model, optimizer = _trained(steps=1)
    manager = checkpointing.CheckpointManager(tmp_path, max_to_keep=2)
    assert manager.checkpoints == [] and manager.latest_checkpoint is None and manager.restore(model, optimizer) is None
    for step in (1, 2, 3, 10):
        manager.save(model, optimizer, step, step)
    assert manager.checkpoints == [tmp_path / "ckpt-3", tmp_path / "ckpt-10"]
    assert manager.latest_checkpoint == tmp_path / "ckpt-10" and manager.latest_step() == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "ckpt-10", "ckpt-3"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        manager.save(model, optimizer, 11, 11)
    assert manager.latest_checkpoint == tmp_path / "ckpt-10" and not (tmp_path / "ckpt-11").exists()
    with pytest.raises(ValueError) as raised:
        checkpointing.CheckpointManager(tmp_path, max_to_keep=0)
    assert "max_to_keep" in str(raised.value)


def test_variables_load_by_name_whatever_their_order_in_the_file(tmp_path):
    model, optimizer = _trained()
    path = checkpointing.CheckpointManager(tmp_path).save(model, optimizer, 2, 2)
    arrays = checkpointing.read(path, "model")
    reversed_order = dict(reversed(list(arrays.items())))
    np.savez(path / "model.npz", **reversed_order)  # stored in the opposite order of model.variables
    manifest = json.loads((path / "state.json").read_text())
    manifest["sha256"]["model"] = hashlib.sha256((path / "model.npz").read_bytes()).hexdigest()
    (path / "state.json").write_text(json.dumps(manifest))
    fresh, fresh_optimizer = _trained(seed=7, steps=1)
    checkpointing.CheckpointManager(tmp_path).restore(fresh, fresh_optimizer)
    for key, variable in checkpointing.model_variables(fresh).items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), arrays[key], err_msg=key)


def test_renamed_or_reshaped_variables_are_refused_naming_them(tmp_path):
    model, optimizer = _trained()
    checkpointing.CheckpointManager(tmp_path).save(model, optimizer, 2, 2)
    other, other_optimizer = _trained(seed=1, steps=1, classifier="gap")  # no class token: a variable less
    before = _values(other.variables)
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
        checkpointing.CheckpointManager(tmp_path).restore(other, other_optimizer)
    assert raised.value.missing == [] and raised.value.unexpected == ["cls/cls"]
    assert (raised.value.path, raised.value.part) == (tmp_path / "ckpt-2", "model")
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(other.variables)))  # nothing was loaded
    wider, wider_optimizer = _trained(seed=1, steps=1, classes=5)
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
        checkpointing.CheckpointManager(tmp_path).restore(wider, wider_optimizer)
    assert ("head/kernel", (8, 3), (8, 5)) in raised.value.mis_shaped and raised.value.part == "model"
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
        checkpointing.CheckpointManager(tmp_path).restore(model, optimizer, run_id="other")
    assert (raised.value.run_id, raised.value.path, raised.value.part) == ("other", tmp_path / "ckpt-2", None)
    assert raised.value.stored_run_id != "other"


def test_an_incompatible_checkpoint_message_names_the_folder_and_the_variables():
    # the one message-text test of IncompatibleCheckpointError: the message is the caller's, the fields are data
    error = checkpointing.IncompatibleCheckpointError("Checkpoint c does not fit: x.", "c", "model", ["a"], ["b"])
    assert str(error) == "Checkpoint c does not fit: x." and (error.missing, error.unexpected) == (["a"], ["b"])


def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    model, optimizer = _trained()
    manager = checkpointing.CheckpointManager(tmp_path, max_to_keep=3)
    manager.save(model, optimizer, 1, 1)
    kept = _values(model.variables)
    manager.save(model, optimizer, 2, 2)
    newest = tmp_path / "ckpt-2" / "model.npz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a failing disk
    fresh, fresh_optimizer = _trained(seed=7, steps=1)
    with caplog.at_level(logging.WARNING, logger="keras_vit.train.checkpointing"):
        state = manager.restore(fresh, fresh_optimizer)
    assert state["step"] == 1
    assert f"Checkpoint {tmp_path / 'ckpt-2'} is unreadable" in caplog.text and "falling back" in caplog.text
    for index, (value, expected) in enumerate(zip(_values(fresh.variables), kept)):
        np.testing.assert_array_equal(value, expected, err_msg=str(index))
