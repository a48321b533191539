"""Few-shot evaluation, attention maps and rollout, attention distance, position-embedding similarity, filters."""

import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_vit
from conftest import REPO, fixture_path, load_reference
from keras_vit import analysis, evaluation

RNG = np.random.default_rng(0)


# --- few-shot -------------------------------------------------------------------------------------------------------


def test_ridge_equals_numpy_closed_form():
    x, y = RNG.normal(size=(40, 6)), RNG.integers(0, 3, 40)
    weights, bias, mean = evaluation.ridge_fit(x, y, 3, l2=0.5)
    centred = x - x.mean(0)
    targets = np.where(np.eye(3)[y] > 0, 1.0, -1.0)
    expected = np.linalg.inv(centred.T @ centred + 0.5 * np.eye(6)) @ centred.T @ targets
    np.testing.assert_allclose(weights, expected, atol=1e-10)
    np.testing.assert_allclose(bias, targets.mean(0))
    # The fitted model is the minimiser: its gradient vanishes.
    residual = centred @ weights + bias - targets
    np.testing.assert_allclose(centred.T @ residual + 0.5 * weights, 0, atol=1e-9)


def test_fewshot_is_perfect_on_well_separated_features():
    centres = RNG.normal(scale=10, size=(5, 16))
    labels = np.repeat(np.arange(5), 40)
    features = centres[labels] + RNG.normal(scale=0.1, size=(200, 16))
    results = keras_vit.evaluation.fewshot(None, (features[::2], labels[::2]), (features[1::2], labels[1::2]), shots=(1, 5), seeds=3)
    assert results == {1: {"mean": 1.0, "std": 0.0}, 5: {"mean": 1.0, "std": 0.0}}
    with pytest.raises(ValueError, match="25-shot needs 25 training examples"):
        keras_vit.evaluation.fewshot(None, (features[:30], labels[:30]), (features, labels), shots=(25,))


def test_fewshot_from_a_model_uses_the_pre_logits():
    ref, _ = load_reference("vit_tiny_repr")
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_repr", "ckpt"))
    features, labels = evaluation.extract_features(evaluation.feature_model(model), (ref["images"], np.arange(4) % 2))
    np.testing.assert_allclose(features, ref["pre_logits"], atol=1e-5)
    data = (ref["images"], np.arange(4) % 2)
    results = evaluation.fewshot(model, data, data, shots=(1,), seeds=2)
    on_features = evaluation.fewshot(None, (ref["pre_logits"], data[1]), (ref["pre_logits"], data[1]), shots=(1,), seeds=2)
    assert results[1]["mean"] == pytest.approx(on_features[1]["mean"])  # the model's pre-logits, nothing else


# --- attention ------------------------------------------------------------------------------------------------------


def _numpy_rollout(attentions, prefix):
    result = np.eye(attentions[0].shape[-1])[None]
    for attention in attentions:
        fused = attention.mean(1) + np.eye(attention.shape[-1])
        fused /= fused.sum(-1, keepdims=True)
        result = np.einsum("bij,bjk->bik", fused, result)
    return result[:, 0] if prefix else result.mean(1)


def _random_attention(batch, heads, tokens):
    logits = RNG.normal(size=(batch, heads, tokens, tokens))
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


@pytest.mark.parametrize("prefix", [0, 1])
def test_rollout_equals_numpy_reference(prefix):
    attentions = [_random_attention(2, 3, 7) for _ in range(4)]
    np.testing.assert_allclose(analysis.rollout(attentions, num_prefix_tokens=prefix), _numpy_rollout(attentions, prefix), atol=1e-12)
    maxed = analysis.rollout(attentions, head_fusion="max")
    assert maxed.shape == (2, 7) and not np.allclose(maxed, _numpy_rollout(attentions, 1))
    discarded = analysis.rollout(attentions, discard_ratio=0.5)
    assert np.all(np.isfinite(discarded)) and np.allclose(analysis.rollout(attentions, discard_ratio=0.0), _numpy_rollout(attentions, 1))


def test_mean_attention_distance_closed_forms():
    grid, tokens = (3, 4), 12
    identity = np.broadcast_to(np.eye(tokens), (2, 5, tokens, tokens))
    np.testing.assert_allclose(analysis.mean_attention_distance([identity], grid, 16, 0), 0.0)
    uniform = np.full((1, 2, tokens + 1, tokens + 1), 1 / (tokens + 1))
    positions = np.array([(r, c) for r in range(3) for c in range(4)], float) * 16
    expected = np.mean([np.linalg.norm(p - q) for p in positions for q in positions])
    np.testing.assert_allclose(analysis.mean_attention_distance([uniform, uniform], grid, 16, 1), np.full((2, 2), expected))
    # Horizontal neighbour only: one patch width in pixels (rectangular patches, columns of 8 px).
    neighbour = np.zeros((1, 1, tokens, tokens))
    for i in range(tokens):
        neighbour[0, 0, i, i + 1 if i % 4 < 3 else i - 1] = 1.0
    np.testing.assert_allclose(analysis.mean_attention_distance([neighbour], grid, (16, 8), 0), [[8.0]])


@pytest.mark.parametrize("name", ["vit_tiny_token", "vit_tiny_gap", "hybrid_tiny"])
def test_attention_maps_of_plain_and_hybrid_models(name):
    ref, config = load_reference(name)
    model = keras_vit.from_official_checkpoint(fixture_path(name, "ckpt"))
    maps = keras_vit.attention_maps(model, ref["images"])
    tokens = ref["tokens_with_posemb"].shape[1]
    assert len(maps) == config["transformer"]["num_layers"] and maps[0].shape == (4, 3, tokens, tokens)
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, atol=1e-5)
    # The first block's attention, recomputed from the official block input with the block's own weights.
    block = model.get_layer("encoderblock_0")
    _, expected = block(ref["tokens_with_posemb"], return_attention_scores=True)
    np.testing.assert_allclose(maps[0], keras.ops.convert_to_numpy(expected), atol=1e-5)
    heat = keras_vit.attention_rollout(model, ref["images"], head_fusion="max", discard_ratio=0.2)
    grid = (4, 4) if name == "hybrid_tiny" else (8, 8)
    assert heat["grid"].shape == (4, *grid) and heat["image"].shape == (4, 32, 32)
    np.testing.assert_allclose(heat["grid"].max(axis=(1, 2)), 1.0)


def test_rollout_on_a_rectangular_grid():
    model = keras_vit.vision_transformer((16, 24), 4, 12, 2, 3, 24, classes=2)
    heat = keras_vit.attention_rollout(model, RNG.uniform(-1, 1, (2, 16, 24, 3)).astype("float32"))
    assert heat["grid"].shape == (2, 4, 6) and heat["image"].shape == (2, 16, 24)


def test_position_embedding_similarity_equals_numpy():
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    similarity = analysis.position_embedding_similarity(model)
    posemb = keras.ops.convert_to_numpy(model.get_layer("posembed_input").pos_embedding)[0, 1:].astype(np.float64)
    expected = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in posemb] for a in posemb])
    assert similarity.shape == (8, 8, 8, 8)
    np.testing.assert_allclose(similarity.reshape(64, 64), expected, atol=1e-10)
    np.testing.assert_allclose(np.diagonal(similarity.reshape(64, 64)), 1.0)


def test_embedding_filter_components_are_the_principal_axes():
    model = keras_vit.from_official_checkpoint(fixture_path("vit_tiny_token", "ckpt"))
    tiles, variance = analysis.embedding_filters(model, num_components=5)
    assert tiles.shape == (5, 4, 4, 3) and tiles.min() == 0.0 and tiles.max() == 1.0
    filters = keras.ops.convert_to_numpy(model.get_layer("embedding").kernel).reshape(48, 48).T.astype(np.float64)
    eigenvalues = np.linalg.eigvalsh(np.cov(filters, rowvar=False))[::-1]
    np.testing.assert_allclose(variance, eigenvalues[:5] / eigenvalues.sum(), rtol=1e-6)


@pytest.mark.slow
def test_visualize_tool_writes_the_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/visualize.py", str(fixture_path("vit_tiny_token", "ckpt")), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("embedding_filters", "position_similarity", "attention_distance", "attention_rollout"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
