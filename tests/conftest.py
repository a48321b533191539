"""Shared test helpers: the official golden fixtures, a tiny recipe configuration and a NumPy reference of the ViT
forward pass.

Tiers: tests marked ``slow`` (a subprocess or an end-to-end run: minutes) are left out of the README's command
``python -m pytest -q -m "not slow"``; ``python -m pytest -q -m slow`` runs them (CI runs both).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("KERAS_VIT_FIXTURES", REPO.parent / "shared" / "fixtures" / "official_vit"))
PLAIN_FIXTURES = ("vit_tiny_token", "vit_tiny_repr", "vit_tiny_gap", "vit_tiny_token_posemb48")
BIG_VISION_FIXTURES = Path(
    os.environ.get("KERAS_VIT_BIG_VISION_FIXTURES", REPO.parent / "shared" / "fixtures" / "big_vision_vit")
)

TIMM_FIXTURES = Path(os.environ.get("KERAS_VIT_TIMM_FIXTURES", REPO.parent / "shared" / "fixtures" / "timm_vit"))
TIMM_TODAY = ("vit_augreg_like", "vit_clip_like", "vit_clip_quickgelu_headless", "vit_dinov2_like",
              "vit_gap_like", "vit_options_like", "vit_reg4_gap_like", "vit_siglip_map_like")  # every timm fixture


def _fixture(folder, variable, name, kind):
    path = folder / f"{name}.{kind}.npz"
    if not path.exists():
        pytest.fail(f"Shared fixture {path} is missing; set {variable} to its folder.")
    return path


def _reference(path):
    with np.load(path, allow_pickle=False) as ref:
        arrays = {k: ref[k] for k in ref.files}
    return arrays, json.loads(str(arrays.pop("config_json")))


# A recipe configuration that trains in seconds: 8 steps of a one-block ViT on the 8x8 digits.
TINY_RUN = [
    "model=Ti/16",
    'model_overrides={"patch_size": 2, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "channels": 1, "dropout_rate": 0.1}',
    "dataset=digits",
    "image_size=8",
    "batch_size=32",
    "steps=8",
    "warmup_steps=2",
    "base_lr=0.01",
    "crop_area=[0.6, 1.0]",
    "flip=false",
    "precision=float32",
    "eval_every=4",
    "checkpoint_every=4",
    "log_every=4",
    "weights=null",
]


def fixture_path(name, kind):
    """Path of ``<name>.<kind>.npz`` (kind: "ckpt" or "ref") in the shared official fixtures."""
    return _fixture(FIXTURES, "KERAS_VIT_FIXTURES", name, kind)


def load_reference(name):
    """The reference arrays of a fixture and its official config (dict)."""
    return _reference(fixture_path(name, "ref"))


def big_vision_path(name, kind):
    """Path of ``<name>.<kind>.npz`` (kind: "ckpt" or "ref") in the shared big_vision fixtures."""
    return _fixture(BIG_VISION_FIXTURES, "KERAS_VIT_BIG_VISION_FIXTURES", name, kind)


def big_vision_reference(name):
    """The reference arrays of a big_vision fixture and its ``vit.Model`` kwargs (dict)."""
    return _reference(big_vision_path(name, "ref"))


def timm_reference(name):
    """The reference arrays of a timm fixture: images (B, H, W, C), tokens, pre_logits and logits (when a head)."""
    with np.load(TIMM_FIXTURES / f"{name}.ref.npz", allow_pickle=False) as ref:
        return {key: ref[key] for key in ref.files}


def timm_fixture_model(name, folder):
    """A keras_vit model built from a timm fixture's inferred arguments, its converted arrays loaded (through an
    official ``.npz`` written to ``folder``)."""
    import keras_vit
    from keras_vit.pretrained.timm import read_timm

    checkpoint = read_timm(TIMM_FIXTURES / name)
    model = keras_vit.vision_transformer(**checkpoint.arguments)
    path = Path(folder) / f"{name}.converted.npz"
    np.savez(path, **checkpoint.arrays)
    return keras_vit.load_weights(model, path, adapt=False)


def builder_kwargs(config):
    """``vision_transformer`` keyword arguments from an official config dict."""
    t = config["transformer"]
    return dict(
        image_size=tuple(config["image_size"]),
        patch_size=tuple(config["patches"]["size"]),
        hidden_size=config["hidden_size"],
        num_layers=t["num_layers"],
        num_heads=t["num_heads"],
        mlp_dim=t["mlp_dim"],
        classifier=config["classifier"],
        representation_size=config["representation_size"],
        classes=config["num_classes"],
    )


# --- FlexiViT's patch resize, as big_vision's resample_patchemb computes it (models/proj/flexi/vit.py). ---

def flexivit_resize_matrix(old, new):
    """(new*new, old*old): column j is the bilinear resize of the j-th basis patch, the matrix B of FlexiViT.

    Built as big_vision's ``resample_patchemb`` builds it: ``tf.image.resize(..., "bilinear")`` of each basis
    patch (TensorFlow 2's default ``antialias=False``); independent of keras_vit's NumPy construction.
    """
    import tensorflow as tf

    basis = np.eye(old * old).reshape(old * old, old, old, 1)
    resized = tf.image.resize(basis, (new, new), "bilinear").numpy()
    return resized.reshape(old * old, new * new).T.astype(np.float64)


def grow_patches(images, old, new):
    """Every old x old patch of (B, H, W, C) images resized on its own to new x new (``flexivit_resize_matrix``)."""
    batch, height, width, channels = images.shape
    gh, gw = height // old, width // old
    patches = images.astype(np.float64).reshape(batch, gh, old, gw, old, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, gh, gw, old * old, channels)
    grown = np.einsum("np,bijpc->bijnc", flexivit_resize_matrix(old, new), patches)
    grown = grown.reshape(batch, gh, gw, new, new, channels).transpose(0, 1, 3, 2, 4, 5)
    return grown.reshape(batch, gh * new, gw * new, channels).astype("float32")


# --- NumPy reference of the official forward pass (float64), written from the fixture README. ---

def graph_ancestors(ops):
    """Names of ``ops`` and of every op they reach through data and control inputs in a ``tf.Graph``."""
    seen, stack = set(), list(ops)
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return seen


def np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_attention(x, p):
    """x (B, T, D); p has query/key/value kernels (D, N, dh), biases (N, dh), out (N, dh, D), (D,)."""
    q = np.einsum("btd,dnh->bnth", x, p["query_kernel"]) + p["query_bias"][None, :, None]
    k = np.einsum("btd,dnh->bnth", x, p["key_kernel"]) + p["key_bias"][None, :, None]
    v = np.einsum("btd,dnh->bnth", x, p["value_kernel"]) + p["value_bias"][None, :, None]
    weights = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
    out = np.einsum("bnth,nhd->btd", weights @ v, p["out_kernel"]) + p["out_bias"]
    return out, weights


def np_block(x, p, gelu=np_gelu_tanh):
    """One pre-LN encoder block; p holds ln0/ln2 scale+bias, attention params and mlp kernels."""
    y, weights = np_attention(np_layer_norm(x, p["ln0_scale"], p["ln0_bias"]), p)
    x = x + y
    h = gelu(np_layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["mlp0_kernel"] + p["mlp0_bias"])
    return x + h @ p["mlp1_kernel"] + p["mlp1_bias"], weights
