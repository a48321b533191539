"""The reference path (``keras_vit.reference_ops()``): a small model's outputs and gradients equal the ViT formulas
computed by a float64 NumPy implementation written here, on every backend; the default (fast) path equals the
reference path in float32 and bfloat16.

The NumPy model is the paper's ViT written from its equations (patch embedding, class token, position
embeddings, pre-LN blocks, final norm, token pooling, head); its gradients are central finite differences in
float64, so nothing of the library's gradient code enters the expectation.
"""

import numpy as np
import pytest
import keras

import keras_vit
from conftest import np_block, np_layer_norm
from keras_vit import _speed

BACKEND = keras.backend.backend()
SMALL = dict(image_size=8, patch_size=4, hidden_size=12, num_layers=2, num_heads=2, mlp_dim=16, classes=3)


def _model(dtype="float32", **options):
    keras.utils.set_random_seed(0)
    model = keras_vit.vision_transformer(**{**SMALL, **options}, dtype=dtype)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def _arrays(model):
    """``{official name: float64 array}`` and ``{official name: variable}`` of ``model``."""
    variables = model.official_weights()
    return {name: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for name, v in variables.items()}, variables


def np_vit(arrays, images, gelu):
    """The ViT of ``arrays`` (official names) on ``images`` (B, H, W, C), float64: (B, classes) logits."""
    kernel = arrays["embedding/kernel"]  # (p, p, C, D)
    p, batch = kernel.shape[0], images.shape[0]
    gh, gw = images.shape[1] // p, images.shape[2] // p
    patches = images.reshape(batch, gh, p, gw, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(batch, gh * gw, -1)
    x = patches @ kernel.reshape(-1, kernel.shape[-1]) + arrays["embedding/bias"]
    x = np.concatenate([np.broadcast_to(arrays["cls"], (batch, 1, x.shape[-1])), x], axis=1)
    x = x + arrays["Transformer/posembed_input/pos_embedding"]
    for i in range(sum(name.endswith("LayerNorm_0/scale") for name in arrays)):
        scope = f"Transformer/encoderblock_{i}/"
        block = {
            "ln0_scale": arrays[scope + "LayerNorm_0/scale"], "ln0_bias": arrays[scope + "LayerNorm_0/bias"],
            "ln2_scale": arrays[scope + "LayerNorm_2/scale"], "ln2_bias": arrays[scope + "LayerNorm_2/bias"],
            "mlp0_kernel": arrays[scope + "MlpBlock_3/Dense_0/kernel"], "mlp0_bias": arrays[scope + "MlpBlock_3/Dense_0/bias"],
            "mlp1_kernel": arrays[scope + "MlpBlock_3/Dense_1/kernel"], "mlp1_bias": arrays[scope + "MlpBlock_3/Dense_1/bias"],
            **{f"{part}_{kind}": arrays[f"{scope}MultiHeadDotProductAttention_1/{part}/{kind}"]
               for part in ("query", "key", "value", "out") for kind in ("kernel", "bias")},
        }
        x, _ = np_block(x, block, gelu)
    x = np_layer_norm(x, arrays["Transformer/encoder_norm/scale"], arrays["Transformer/encoder_norm/bias"])
    return x[:, 0] @ arrays["head/kernel"] + arrays["head/bias"]


def np_gelu(form):
    if form == "erf":
        from scipy.special import erf

        return lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_gradients(arrays, images, cotangent, gelu, eps=1e-6):
    """Central differences of ``sum(np_vit(...) * cotangent)`` for every array and the images, float64."""
    loss = lambda a, x: float(np.sum(np_vit(a, x, gelu) * cotangent))  # noqa: E731
    gradients = {}
    for name in [*arrays, "images"]:
        base = images if name == "images" else arrays[name]
        gradient = np.zeros_like(base)
        for index in np.ndindex(base.shape):
            values = []
            for sign in (1, -1):
                moved = base.copy()
                moved[index] += sign * eps
                values.append(loss(arrays, moved) if name == "images" else loss({**arrays, name: moved}, images))
            gradient[index] = (values[0] - values[1]) / (2 * eps)
        gradients[name] = gradient
    return gradients


def model_gradients(model, variables, images, cotangent):
    """``(outputs, {official name or "images": gradient})`` of ``sum(model(images) * cotangent)`` on this backend."""
    names = {id(v): name for name, v in variables.items()}
    trainable = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(images)
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = model(x)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * cotangent)
        grads = tape.gradient(loss, [*trainable, x])
        outputs = outputs.numpy()
    elif BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(values, x):
            outputs, _ = model.stateless_call(values, non_trainable, x)
            return jax.numpy.sum(outputs.astype("float32") * cotangent), outputs

        (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)([v.value for v in trainable], images)
        grads = [*grads[0], grads[1]]
    else:
        import torch

        x = torch.tensor(images, requires_grad=True)
        outputs = model(x)
        loss = torch.sum(outputs.float() * torch.tensor(cotangent))
        grads = torch.autograd.grad(loss, [v.value for v in trainable] + [x])
        outputs = outputs.detach()
    grads = [np.asarray(keras.ops.convert_to_numpy(g), np.float64) for g in grads]
    named = {names[id(v)]: g for v, g in zip(trainable, grads)}
    named["images"] = grads[-1]
    return np.asarray(keras.ops.convert_to_numpy(outputs), np.float64), named


def _inputs(seed=2):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype("float32")
    cotangent = rng.normal(size=(2, 3)).astype("float32")
    return images, cotangent


def _relative(actual, expected, floor=1e-12):
    """The largest difference relative to the largest expected value (at least ``floor``)."""
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), floor)


def _relative_gradients(actual, expected):
    """``{name: _relative}`` of two gradient dicts. The key bias's gradient is zero in exact arithmetic (softmax
    ignores a constant added to every logit of a row): it is measured against the largest gradient of all."""
    scale = max(np.max(np.abs(g)) for g in expected.values())
    return {name: _relative(actual[name], expected[name], scale if name.endswith("key/bias") else 1e-12)
            for name in expected}


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_the_reference_path_computes_the_vit_formulas_and_their_gradients(gelu):
    model = _model(gelu=gelu)
    arrays, variables = _arrays(model)
    images, cotangent = _inputs()
    with keras_vit.reference_ops():
        outputs, gradients = model_gradients(model, variables, images, cotangent)
    expected = np_vit(arrays, images.astype(np.float64), np_gelu(gelu))
    np.testing.assert_allclose(outputs, expected, atol=1e-5 * np.abs(expected).max())
    expected_gradients = np_gradients(arrays, images.astype(np.float64), cotangent.astype(np.float64), np_gelu(gelu))
    assert set(gradients) == set(expected_gradients)  # every weight, and the input
    worst = _relative_gradients(gradients, expected_gradients)
    assert max(worst.values()) < 2e-5, sorted(worst.items(), key=lambda item: -item[1])[:3]


@pytest.mark.parametrize("dtype, tolerance, gradient_tolerance", [("float32", 2e-5, 2e-5),
                                                                   ("mixed_bfloat16", 0.05, 0.08)])
def test_the_default_path_equals_the_reference_path(dtype, tolerance, gradient_tolerance):
    # float32: the same numbers up to float32 rounding (fused products and kernels sum in another order).
    # bfloat16: up to bfloat16 rounding (8 significant bits; and the tanh GELU swap on PyTorch CPUs): outputs within
    # the 0.05 of the mixed_bfloat16 fixture test (test_keras_native); gradients pass through a dozen bfloat16
    # roundings of two blocks (measured: at most 0.051 of an array's largest value, the key kernel on PyTorch).
    model = _model(dtype=dtype, dropout_rate=0.0)
    _, variables = _arrays(model)
    images, cotangent = _inputs(3)
    fast_outputs, fast = model_gradients(model, variables, images, cotangent)
    with keras_vit.reference_ops():
        reference_outputs, reference = model_gradients(model, variables, images, cotangent)
    assert _relative(fast_outputs, reference_outputs) < tolerance
    worst = _relative_gradients(fast, reference)
    assert max(worst.values()) < gradient_tolerance, sorted(worst.items(), key=lambda item: -item[1])[:3]


def test_reference_ops_turns_every_speed_path_off_within_its_block_only():
    assert all(_speed.enabled(path) for path in _speed.SPEED_PATHS)
    with keras_vit.reference_ops():
        assert not any(_speed.enabled(path) for path in _speed.SPEED_PATHS)
        assert not (_speed.fused_attention() or _speed.fused_bias() or _speed.lean_gradients())
        assert not _speed.half_softmax("bfloat16")
        with _speed.plain_autodiff():  # nested switches leave the outer ones as they were
            assert not _speed.enabled("fused_projections")
        assert not _speed.enabled("fused_projections")
    assert all(_speed.enabled(path) for path in _speed.SPEED_PATHS)
    with pytest.raises(ValueError) as error:
        with _speed.speed_paths_off("fused_qkv"):
            pass
    assert "fused_projections" in str(error.value)


def test_the_half_softmax_is_used_only_where_it_is_measured_to_compute_in_float32():
    # The speed path is a measured fact of this process's kernels: where it is on, TensorFlow's softmax of bfloat16
    # logits is the float32 softmax rounded (on CPUs without native bfloat16, oneDNN computes it in bfloat16).
    if BACKEND != "tensorflow":
        assert not _speed.half_softmax("bfloat16")
        return
    assert _speed.half_softmax("bfloat16") == _speed._softmax_keeps_float32("bfloat16")
    assert not _speed.half_softmax("float32")
