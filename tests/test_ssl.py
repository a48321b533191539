"""Masked patch prediction: corruption statistics, mean-colour targets, loss masking, encoder reuse."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_vit
from conftest import REPO
from keras_vit import ssl

n = keras.ops.convert_to_numpy


def _wrapper(channels=3, seed=0, **kwargs):
    encoder = keras_vit.vision_transformer(16, 2, 12, 1, 2, 24, include_top=False, channels=channels, **kwargs)
    return ssl.MaskedPatchPrediction(encoder, seed=seed)


def test_corruption_proportions():
    model = _wrapper()
    codes = n(model.corruption(400, 64))
    np.testing.assert_array_equal((codes > 0).sum(1), 32)  # exactly half of each image's patches
    corrupted = codes[codes > 0]
    for code, share in ((1, 0.8), (2, 0.1), (3, 0.1)):  # 12,800 draws: standard error < 0.004
        assert abs(np.mean(corrupted == code) - share) < 0.015, (code, np.mean(corrupted == code))
    assert len({tuple(row) for row in (codes > 0)}) == 400  # different positions per image


def test_corrupted_embeddings():
    model = _wrapper()
    embeddings = np.random.default_rng(0).normal(size=(8, 64, 12)).astype("float32")
    corrupted, codes = model.corrupt(embeddings)
    corrupted, codes = n(corrupted), n(codes)
    mask = n(model.mask_token)[0, 0]
    np.testing.assert_array_equal(corrupted[codes == 1], np.broadcast_to(mask, ((codes == 1).sum(), 12)))
    np.testing.assert_array_equal(corrupted[(codes == 0) | (codes == 3)], embeddings[(codes == 0) | (codes == 3)])
    pool = {tuple(row) for row in embeddings.reshape(-1, 12)}
    assert all(tuple(row) in pool for row in corrupted[codes == 2])


def test_targets_equal_numpy_quantised_mean_colours():
    images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype("float32")
    images[0, :2, :2] = [-1.0, 1.0, 0.0]  # a patch of known colour: levels (0, 7, 4) -> 0*64 + 7*8 + 4
    targets = n(ssl.mean_colour_targets(images, 2))
    means = (images.reshape(3, 8, 2, 8, 2, 3).mean(axis=(2, 4)) + 1) / 2
    levels = np.clip(np.floor(means * 8), 0, 7)
    expected = (levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]).reshape(3, 64)
    np.testing.assert_array_equal(targets, expected)
    assert targets[0, 0] == 60 and targets.max() < 512
    gray = n(ssl.mean_colour_targets(images[..., :1], (4, 2)))
    assert gray.shape == (3, 32) and gray.max() < 8


def test_only_corrupted_positions_count():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(2, 6, 5)).astype("float32"), rng.integers(0, 5, (2, 6)).astype("int32")
    weights = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], "float32")
    loss, accuracy = ssl.masked_loss_and_accuracy(logits, targets, weights)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(n(loss), (nll * weights).sum(1) / weights.sum(1), atol=1e-5)
    changed = logits.copy()
    changed[weights == 0] += rng.normal(scale=5, size=changed[weights == 0].shape)
    np.testing.assert_allclose(n(ssl.masked_loss_and_accuracy(changed, targets, weights)[0]), n(loss), atol=1e-6)
    hits = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(n(accuracy), hits.sum(1) / weights.sum(1))


def test_hybrid_encoders_are_refused():
    encoder = keras_vit.vision_transformer(32, 1, 12, 1, 2, 24, include_top=False, resnet_layers=(), resnet_width_factor=0.5)
    with pytest.raises(ValueError) as raised:
        ssl.MaskedPatchPrediction(encoder)
    assert "ResNet" in str(raised.value)


SHORT = ["steps=6", "warmup_steps=2", "batch_size=32", "eval_every=3", "checkpoint_every=3", "log_every=3", "jit_compile=false"]


def _ssl_run(folder, *overrides):
    from keras_vit.train import runner, settings

    return runner.run(settings.load_config(settings.PRETRAIN_SSL, "pretrain_ssl_digits", SHORT + [f"output_dir={folder}", *overrides]))


def test_ssl_runs_are_deterministic_and_the_encoder_loads_into_a_classifier(tmp_path):
    report = _ssl_run(tmp_path / "a")
    again = _ssl_run(tmp_path / "b")
    other = _ssl_run(tmp_path / "c", "seed=1")
    losses = lambda r: [row["loss"] for row in r["history"]]  # noqa: E731
    assert report["config"]["task"] == "masked_patch_prediction" and [row["step"] for row in report["history"]] == [3, 6]
    assert (report["top1"], losses(report)) == (again["top1"], losses(again))
    assert losses(other) != losses(report)  # the seed changes the corruption and the data: the equality above can fail
    encoder = keras.models.load_model(tmp_path / "a" / "model.keras")
    assert "head" not in [layer.name for layer in encoder.layers]
    classifier = keras_vit.create_model(
        "Ti/16", weights=tmp_path / "a" / "model.keras", image_size=16, classes=10,
        patch_size=2, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128, channels=1,
    )
    np.testing.assert_array_equal(n(classifier.get_layer("posembed_input").pos_embedding), n(encoder.get_layer("posembed_input").pos_embedding))
    assert not n(classifier.get_layer("head").kernel).any()


@pytest.mark.slow
def test_ssl_recipe_writes_the_encoder(tmp_path):
    result = subprocess.run(
        [sys.executable, "recipes/pretrain_ssl.py", "--preset", "pretrain_ssl_digits", "--output-dir", str(tmp_path), *SHORT],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["task"] == "masked_patch_prediction" and report["steps"] == 6
    assert keras.models.load_model(tmp_path / "model.keras").count_params() == report["parameters"]
