"""timm / Hugging Face Hub checkpoints: reading, timm -> official conversion, architecture inference, Hub ids.

The oracle is the shared timm fixtures (../shared/fixtures/timm_vit, made by timm 1.0.31's own code and saved by
its own ``save_for_hf``). Two NumPy forward passes written here from timm's and from the official semantics, one
on timm's arrays and one on the converted official arrays with the inferred arguments, must both give timm's
outputs. Every fixture built and run through the public API on each backend: tests/test_timm_options.py.
"""

import hashlib
import http.server
import json
import os
import pickle
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TIMM_FIXTURES,
    np_gelu_tanh,
    np_layer_norm,
    np_softmax,
    timm_reference,
)
from safetensors.numpy import load_file, save_file
from scipy.special import erf

import keras
import keras_vit
from keras_vit.pretrained import download, hub, safetensors_file
from keras_vit.pretrained.timm import (
    UnsupportedArchitectureError,
    infer_arguments,
    read_timm,
    timm_arguments,
)
from keras_vit.pretrained.timm_entry_points import ENTRY_POINTS
from keras_vit.pretrained.timm_names import UnknownArraysError, to_official

MANIFEST = json.loads((TIMM_FIXTURES / "manifest.json").read_text())["fixtures"]
NAMES = sorted(MANIFEST)
# What the fixtures' README states of each (timm's defaults otherwise: exact GELU, eps 1e-6, class-token posemb row).
FACTS = {
    "vit_augreg_like": dict(),
    "vit_clip_like": dict(pre_norm=True, eps=1e-5),
    "vit_clip_quickgelu_headless": dict(pre_norm=True, eps=1e-5, act="quick"),
    "vit_dinov2_like": dict(layer_scale=1e-5),
    "vit_reg4_gap_like": dict(no_embed_class=True, fc_norm=True),
    "vit_siglip_map_like": dict(),
    "vit_gap_like": dict(),
    "vit_options_like": dict(qkv_bias=False, qk_norm=True, layer_scale=0.5, act="tanh"),
}
_POOL = {"token": "token", "avg": "gap", "map": "map"}  # timm's global_pool -> keras_vit's classifier


def _facts(name):
    return dict(dict(pre_norm=False, eps=1e-6, act="erf", layer_scale=None, no_embed_class=False, fc_norm=False,
                     qkv_bias=True, qk_norm=False), **FACTS[name])


_ACTIVATIONS = {
    "erf": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "tanh": np_gelu_tanh,
    "quick": lambda x: x / (1 + np.exp(-1.702 * x)),
}


# --- timm's forward pass, in NumPy on timm's arrays (PyTorch layouts), written from timm's vision_transformer.py ---

def _attend(q, k, v):
    """q (B, N, T, dh), k, v (B, N, S, dh) -> (B, T, N * dh)."""
    weights = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
    out = weights @ v
    return out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


def timm_forward(sd, images, heads, facts, pool, prefix):
    sd = {key: value.astype(np.float64) for key, value in sd.items()}
    eps, act = facts["eps"], _ACTIVATIONS[facts["act"]]
    ln = lambda x, name: np_layer_norm(x, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)  # noqa: E731
    linear = lambda x, name: x @ sd[f"{name}.weight"].T + sd.get(f"{name}.bias", 0)  # noqa: E731
    pixels = images.astype(np.float64).transpose(0, 3, 1, 2)  # NCHW
    weight = sd["patch_embed.proj.weight"]
    b, c, h, w = pixels.shape
    p = weight.shape[-1]
    grid = np.einsum("bciujv,dcuv->bijd", pixels.reshape(b, c, h // p, p, w // p, p), weight)
    x = (grid + sd.get("patch_embed.proj.bias", 0)).reshape(b, -1, weight.shape[0])
    tokens = [np.broadcast_to(sd[k], (b, *sd[k].shape[1:])) for k in ("cls_token", "reg_token") if k in sd]
    if facts["no_embed_class"]:
        x = np.concatenate(tokens + [x + sd["pos_embed"]], axis=1)
    else:
        x = np.concatenate(tokens + [x], axis=1) + sd["pos_embed"]
    if "norm_pre.weight" in sd:
        x = ln(x, "norm_pre")
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    for i in range(depth):
        blk = f"blocks.{i}"
        qkv = linear(ln(x, f"{blk}.norm1"), f"{blk}.attn.qkv")
        q, k, v = qkv.reshape(b, x.shape[1], 3, heads, -1).transpose(2, 0, 3, 1, 4)
        if f"{blk}.attn.q_norm.weight" in sd:
            q, k = ln(q, f"{blk}.attn.q_norm"), ln(k, f"{blk}.attn.k_norm")
        y = linear(_attend(q, k, v), f"{blk}.attn.proj") * sd.get(f"{blk}.ls1.gamma", 1)
        x = x + y
        y = linear(act(linear(ln(x, f"{blk}.norm2"), f"{blk}.mlp.fc1")), f"{blk}.mlp.fc2")
        x = x + y * sd.get(f"{blk}.ls2.gamma", 1)
    if "norm.weight" in sd:
        x = ln(x, "norm")
    out = {"tokens": x}
    if pool == "token":
        pooled = x[:, 0]
    elif pool == "avg":
        pooled = x[:, prefix:].mean(1)
    else:  # "map": attn_pool on the grid tokens
        q = linear(sd["attn_pool.latent"], "attn_pool.q").reshape(1, 1, heads, -1).transpose(0, 2, 1, 3)
        kv = linear(x[:, prefix:], "attn_pool.kv").reshape(b, -1, 2, heads, q.shape[-1]).transpose(2, 0, 3, 1, 4)
        y = linear(_attend(np.broadcast_to(q, (b, *q.shape[1:])), kv[0], kv[1]), "attn_pool.proj")
        pooled = (y + linear(act(linear(ln(y, "attn_pool.norm"), "attn_pool.mlp.fc1")), "attn_pool.mlp.fc2"))[:, 0]
    if "fc_norm.weight" in sd:
        pooled = ln(pooled, "fc_norm")
    out["pre_logits"] = pooled
    if "head.weight" in sd:
        out["logits"] = linear(pooled, "head")
    return out


# --- the same network in NumPy on official arrays and keras_vit's builder arguments (the new options included) ---

def official_forward(a, images, args):
    a = {key: value.astype(np.float64) for key, value in a.items()}
    eps, act = args["layer_norm_epsilon"], _ACTIVATIONS[args["gelu"]]
    ln = lambda x, scope: np_layer_norm(x, a[f"{scope}/scale"], a[f"{scope}/bias"], eps)  # noqa: E731
    dense = lambda x, scope: x @ a[f"{scope}/kernel"] + a[f"{scope}/bias"]  # noqa: E731

    def attention(x, key_value, scope):
        q, k, v = (np.einsum("btd,dnh->bnth", y, a[f"{scope}/{part}/kernel"])
                   + a.get(f"{scope}/{part}/bias", np.zeros(a[f"{scope}/{part}/kernel"].shape[1:]))[:, None]
                   for y, part in ((x, "query"), (key_value, "key"), (key_value, "value")))
        if args["qk_norm"] and f"{scope}/query_ln/scale" in a:
            q, k = ln(q, f"{scope}/query_ln"), ln(k, f"{scope}/key_ln")
        weights = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
        return np.einsum("bnth,nhd->btd", weights @ v, a[f"{scope}/out/kernel"]) + a[f"{scope}/out/bias"]

    kernel = a["embedding/kernel"]  # (ph, pw, C, D)
    (ph, pw, c, d), b = kernel.shape, images.shape[0]
    gh, gw = images.shape[1] // ph, images.shape[2] // pw
    grid = np.einsum("biujvc,uvcd->bijd", images.astype(np.float64).reshape(b, gh, ph, gw, pw, c), kernel)
    x = (grid + a.get("embedding/bias", 0)).reshape(b, gh * gw, d)
    prefix = [np.broadcast_to(a[k], (b, *a[k].shape[1:])) for k in ("cls", "reg") if k in a]
    posemb = a["Transformer/posembed_input/pos_embedding"]
    if args["posemb_class_token"]:
        x = np.concatenate(prefix + [x], 1) + posemb
    else:
        x = np.concatenate(prefix + [x + posemb], 1)
    if args["pre_norm"]:
        x = ln(x, "Transformer/pre_norm")
    for i in range(args["num_layers"]):
        blk = f"Transformer/encoderblock_{i}"
        scales = [a.get(f"{blk}/LayerScale_{j}/scale", 1.0) for j in (0, 1)]
        y = ln(x, f"{blk}/LayerNorm_0")
        x = x + attention(y, y, f"{blk}/MultiHeadDotProductAttention_1") * scales[0]
        y = dense(act(dense(ln(x, f"{blk}/LayerNorm_2"), f"{blk}/MlpBlock_3/Dense_0")), f"{blk}/MlpBlock_3/Dense_1")
        x = x + y * scales[1]
    if not args["fc_norm"]:
        x = ln(x, "Transformer/encoder_norm")
    out = {"tokens": x}
    grid_tokens = x[:, sum(t.shape[1] for t in prefix):]
    classifier = args["classifier"] if args["include_top"] else args["pooling"]
    if classifier == "token":
        pooled = x[:, 0]
    elif classifier == "gap":
        pooled = grid_tokens.mean(1)
    else:  # "map"
        probe = np.broadcast_to(a["MAPHead_0/probe"], (b, 1, d))
        y = attention(probe, grid_tokens, "MAPHead_0/MultiHeadDotProductAttention_0")
        pooled = (y + dense(act(dense(ln(y, "MAPHead_0/LayerNorm_0"), "MAPHead_0/MlpBlock_0/Dense_0")),
                            "MAPHead_0/MlpBlock_0/Dense_1"))[:, 0]
    if args["fc_norm"]:
        pooled = ln(pooled, "fc_norm")
    out["pre_logits"] = pooled
    if args["include_top"]:
        out["logits"] = dense(pooled, "head")
    return out


def _close(outputs, ref, where):
    for key, atol in (("tokens", 1e-4), ("pre_logits", 1e-5), ("logits", 1e-5)):
        if key in ref:
            np.testing.assert_allclose(outputs[key], ref[key], atol=atol, rtol=0, err_msg=f"{where}: {key}")
    assert ("logits" in outputs) == ("logits" in ref), where


# --- reading, conversion, inference: every shared fixture ---

@pytest.mark.parametrize("name", NAMES)
def test_inferred_arguments_are_the_fixture_facts(name):
    manifest, facts = MANIFEST[name], _facts(name)
    args = read_timm(TIMM_FIXTURES / name).arguments
    given = manifest["model_args"]
    grid_tokens = manifest["outputs"]["tokens"][1] - manifest["num_prefix_tokens"]
    patch = given["img_size"] // int(round(np.sqrt(grid_tokens)))
    assert args["classifier"] == _POOL[manifest["global_pool"]]
    assert (args["hidden_size"], args["num_layers"], args["num_heads"]) == (given["embed_dim"], given["depth"],
                                                                           given["num_heads"])
    assert args["image_size"] == (given["img_size"],) * 2 and args["patch_size"] == (patch, patch)
    assert args["mlp_dim"] == 4 * given["embed_dim"] and args["channels"] == 3
    assert int(args["classifier"] == "token") + args["num_register_tokens"] == manifest["num_prefix_tokens"]
    if given["num_classes"]:
        assert args["include_top"] and args["classes"] == given["num_classes"]
    else:
        assert not args["include_top"] and args["pooling"] == _POOL[manifest["global_pool"]]
    expected = dict(pre_norm=facts["pre_norm"], fc_norm=facts["fc_norm"], layer_scale=facts["layer_scale"],
                    qkv_bias=facts["qkv_bias"], qk_norm=facts["qk_norm"], gelu=facts["act"],
                    layer_norm_epsilon=facts["eps"], posemb_class_token=not facts["no_embed_class"])
    assert {key: args[key] for key in expected} == expected
    assert args["representation_size"] is None


@pytest.mark.parametrize("name", NAMES)
def test_converted_arrays_give_timms_outputs(name):
    """timm's arrays in timm's forward and the official arrays in the official forward both give timm's outputs."""
    manifest, ref = MANIFEST[name], timm_reference(name)
    checkpoint = read_timm(TIMM_FIXTURES / name)
    state = load_file(TIMM_FIXTURES / name / "model.safetensors")
    heads = manifest["model_args"]["num_heads"]
    _close(timm_forward(state, ref["images"], heads, _facts(name), manifest["global_pool"],
                        manifest["num_prefix_tokens"]), ref, f"{name} (timm layout)")
    _close(official_forward(checkpoint.arrays, ref["images"], checkpoint.arguments), ref, f"{name} (official layout)")


def test_layouts_in_closed_form():
    """Each official array is its timm array re-indexed: kernel[u, v, c, d] = W[d, c, u, v], query[d, n, h] =
    qkv[n * dh + h, d] (key, value: the next thirds), out[n, h, d] = proj[d, n * dh + h], the MAP head's key and
    value the halves of its fused kv."""
    state = load_file(TIMM_FIXTURES / "vit_siglip_map_like" / "model.safetensors")
    arrays = read_timm(TIMM_FIXTURES / "vit_siglip_map_like").arrays
    d, dh = 48, 16
    n, h, j, c, u, v = 2, 5, 7, 1, 3, 11
    assert arrays["embedding/kernel"][u, v, c, j] == state["patch_embed.proj.weight"][j, c, u, v]
    attention = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    for part, third in (("query", 0), ("key", 1), ("value", 2)):
        row = third * d + n * dh + h
        assert arrays[f"{attention}/{part}/kernel"][j, n, h] == state["blocks.1.attn.qkv.weight"][row, j]
        assert arrays[f"{attention}/{part}/bias"][n, h] == state["blocks.1.attn.qkv.bias"][row]
    assert arrays[f"{attention}/out/kernel"][n, h, j] == state["blocks.1.attn.proj.weight"][j, n * dh + h]
    assert arrays["head/kernel"][j, 4] == state["head.weight"][4, j]
    pool = "MAPHead_0/MultiHeadDotProductAttention_0"
    for part, half in (("key", 0), ("value", 1)):
        assert arrays[f"{pool}/{part}/kernel"][j, n, h] == state["attn_pool.kv.weight"][half * d + n * dh + h, j]
    assert arrays[f"{pool}/query/kernel"][j, n, h] == state["attn_pool.q.weight"][n * dh + h, j]
    options = read_timm(TIMM_FIXTURES / "vit_options_like").arrays
    assert f"{attention}/query/bias" not in options
    assert options[f"{attention}/key_ln/scale"].shape == (dh,)
    assert options["Transformer/encoderblock_0/LayerScale_1/scale"].shape == (d,)


def test_preprocessing_travels_with_the_weights():
    clip = read_timm(TIMM_FIXTURES / "vit_clip_like").preprocessing
    config = json.loads((TIMM_FIXTURES / "vit_clip_like" / "config.json").read_text())["pretrained_cfg"]
    assert clip["mean"] == tuple(config["mean"]) and clip["std"] == tuple(config["std"])
    assert (clip["interpolation"], clip["crop_pct"], clip["input_size"]) == ("bicubic", config["crop_pct"], (32, 32))


# --- the one loader: from_official_checkpoint, load_weights and weights= read timm sources ---

def _timm_sources(tmp_path, monkeypatch, name):
    """The fixture ``name`` as each kind of source: its folder, its model.safetensors (beside config.json), a Hub id
    answered from a Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the cache must answer
    _hf_cache(tmp_path / "hf", REPO_ID, name)
    return [TIMM_FIXTURES / name, str(TIMM_FIXTURES / name / "model.safetensors"), f"hf-hub:{REPO_ID}"]


@pytest.mark.parametrize("name", ["vit_augreg_like", "vit_reg4_gap_like"])  # every fixture: test_timm_options.py
def test_the_one_loader_builds_timm_checkpoints(name, tmp_path, monkeypatch):
    ref = timm_reference(name)
    for source in _timm_sources(tmp_path, monkeypatch, name):
        model = keras_vit.from_official_checkpoint(source)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(ref["images"])), ref["logits"], atol=1e-5, rtol=0)
    twin = keras_vit.vision_transformer(**model.vit_config)
    keras_vit.load_weights(twin, TIMM_FIXTURES / name, adapt=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(twin(ref["images"])), ref["logits"], atol=1e-5, rtol=0)


def test_the_one_loader_refuses_pytorch_pickles_in_one_line(tmp_path, no_hub):
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(TIMM_FIXTURES / "vit_augreg_like" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    url = "http://127.0.0.1:9/timm/vit/resolve/main/pytorch_model.bin"  # refused before any download
    model = keras_vit.vision_transformer(image_size=32, patch_size=16, hidden_size=48, num_layers=2, num_heads=3,
                                         mlp_dim=192, classes=5)
    for load in (lambda s: keras_vit.from_official_checkpoint(s), lambda s: keras_vit.load_weights(model, s)):
        for source in (folder, folder / "pytorch_model.bin", url):
            with pytest.raises(ValueError) as refused:
                load(source)
            assert "model.safetensors" in str(refused.value) and "\n" not in str(refused.value)


# --- safetensors headers and refusals ---

def _safetensors_bytes(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _one_array_file(path, header_entry, data):
    path.write_bytes(_safetensors_bytes({"w": header_entry}, data))
    return path


@pytest.fixture
def unread(monkeypatch):
    """Fails the test if any array is read (the safetensors library opened)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the arrays were read")

    monkeypatch.setattr(safetensors_file, "safe_open", refuse)


def test_a_truncated_file_is_refused_unread(tmp_path, unread):
    folder = shutil.copytree(TIMM_FIXTURES / "vit_augreg_like", tmp_path / "repo")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        read_timm(folder)


@pytest.mark.parametrize("entry, data, facts", [
    (dict(dtype="F32", shape=[4, 4], data_offsets=[0, 64]), bytes(16), r"'w'.* 0..64 of a 16-byte"),  # past the end
    (dict(dtype="F32", shape=[1000, 1000], data_offsets=[0, 16]), bytes(16), r"'w'.*4,000,000 bytes"),  # shape lies
    (dict(dtype="I64", shape=[2], data_offsets=[0, 16]), bytes(16), r"'w' is I64"),
    (dict(dtype="F32", shape=[1, 1, 1, 1, 1], data_offsets=[0, 4]), bytes(4), r"'w' is shaped \[1, 1, 1, 1, 1\]"),
    (dict(dtype="F32", shape=[2], data_offsets=[0, 8]), bytes(12), r"take 8 bytes .* holds 12"),  # trailing bytes
])
def test_a_header_that_lies_is_refused_unread(tmp_path, unread, entry, data, facts):
    path = _one_array_file(tmp_path / "w.safetensors", entry, data)
    with pytest.raises(ValueError, match=facts) as error:
        safetensors_file.read_safetensors(path)
    assert str(path) in str(error.value)


def test_a_header_length_beyond_the_file_is_refused(tmp_path, unread):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match=r"declares a 1,099,511,627,776-byte header in a 10-byte file"):
        safetensors_file.tensor_headers(path)


def test_bfloat16_is_widened(tmp_path):
    values = np.array([1.5, -2.0, 3.25], np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    path = _one_array_file(tmp_path / "w.safetensors", dict(dtype="BF16", shape=[3], data_offsets=[0, 6]),
                           bits.tobytes())
    np.testing.assert_array_equal(safetensors_file.read_safetensors(path)["w"], values)


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pth", "model.safetensors"])
def test_pytorch_pickles_are_refused_unread(tmp_path, file_name):
    marker = tmp_path / "unpickled"
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / file_name).write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=4))
    source = repo if file_name == "pytorch_model.bin" else repo / file_name
    with pytest.raises(ValueError, match=r"PyTorch pickle checkpoint.*model\.safetensors"):
        read_timm(source)
    assert not marker.exists()


def test_nonfinite_values_are_refused_unless_allowed(tmp_path):
    folder = shutil.copytree(TIMM_FIXTURES / "vit_augreg_like", tmp_path / "repo")
    state = load_file(folder / "model.safetensors")
    state["blocks.1.mlp.fc2.bias"][3] = np.nan
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc2.bias' \(1 of 48 values\)"):
        read_timm(folder)
    arrays = read_timm(folder, allow_nonfinite=True).arrays
    assert np.isnan(arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"][3])


# --- the architecture: entry points, config against arrays ---

@pytest.mark.parametrize("architecture", [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",  # augreg(2)
    "vit_base_patch16_clip_224", "vit_large_patch14_clip_336", "vit_base_patch16_clip_quickgelu_224",  # CLIP
    "vit_small_patch14_dinov2", "vit_large_patch14_dinov2", "vit_base_patch14_reg4_dinov2",  # DINOv2
    "vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_384", "vit_base_patch16_siglip_gap_224",  # SigLIP
    "vit_betwixt_patch16_reg4_gap_256", "vit_medium_patch16_gap_256", "vit_base_patch16_gap_224",  # reg*, gap
])
def test_the_families_people_use_are_covered(architecture):
    timm_arguments(architecture)


@pytest.mark.parametrize("architecture, missing", [
    ("vit_giant_patch14_dinov2", "mlp_layer='SwiGLUPacked'"),
    ("aimv2_large_patch14_224", "proj_bias=False"),
    ("vit_base_patch16_xp_224", "block_fn='ParallelScalingBlock'"),
    ("vit_dwee_patch16_reg1_gap_256", "attn_layer='diff'"),
    ("beit3_base_patch16_224", "scale_attn_norm=True"),
    ("vit_intern300m_patch14_448", "final_norm=False"),
    ("eva_large_patch14_196", "class token beside 'avg' pooling"),
    ("test_vit3", "pool_include_prefix=True"),
    ("eva02_base_patch14_224", "RoPE"),
    ("vit_base_patch16_rope_reg1_gap_256", "RoPE"),
    ("naflexvit_base_patch16_gap", "NaFlex"),
    ("vit_base_r50_s16_384", "hybrid"),
    ("vit_relpos_base_patch16_224", "relative position"),
    ("deit_base_distilled_patch16_224", "distillation"),
    ("resnet50", "vision_transformer.py"),
])
def test_what_keras_vit_lacks_is_refused_naming_it(architecture, missing):
    with pytest.raises(UnsupportedArchitectureError) as error:
        timm_arguments(architecture)
    assert error.value.architecture == architecture and any(missing in part for part in error.value.missing)


def test_model_args_override_the_entry_point():
    shapes = {k: v.shape for k, v in load_file(TIMM_FIXTURES / "vit_options_like" / "model.safetensors").items()}
    args = infer_arguments("vit_base_patch16_224", shapes, MANIFEST["vit_options_like"]["model_args"])
    assert (args["qk_norm"], args["qkv_bias"], args["layer_scale"], args["gelu"]) == (True, False, 0.5, "tanh")
    with pytest.raises(UnsupportedArchitectureError) as error:
        infer_arguments("vit_base_patch16_224", shapes, dict(MANIFEST["vit_options_like"]["model_args"],
                                                             act_layer="silu"))
    assert error.value.missing == ("the activation 'silu' (act_layer)",)


@pytest.mark.parametrize("model_args, what", [
    (dict(num_heads=5), "num_heads"),
    (dict(embed_dim=64), "embed_dim"),
    (dict(depth=3), "depth"),
    (dict(qkv_bias=False), "qkv_bias"),
    (dict(init_values=1e-5), "layer_scale"),
    (dict(pre_norm=True), "pre_norm"),
    (dict(num_classes=7), "num_classes"),
])
def test_a_config_that_does_not_describe_the_arrays_is_refused(model_args, what):
    with pytest.raises(ValueError, match=what):
        read_timm(TIMM_FIXTURES / "vit_augreg_like", model_args=model_args)


def test_a_bare_safetensors_file_needs_its_entry_point(tmp_path):
    path = shutil.copy(TIMM_FIXTURES / "vit_augreg_like" / "model.safetensors", tmp_path / "augreg.safetensors")
    with pytest.raises(ValueError, match="pass architecture="):
        read_timm(path)
    small = dict(embed_dim=48, depth=2, num_heads=3, num_classes=5)
    checkpoint = read_timm(path, architecture="vit_base_patch16_224", model_args=small)
    assert checkpoint.preprocessing is None
    assert checkpoint.arguments == read_timm(TIMM_FIXTURES / "vit_augreg_like").arguments


def test_a_legacy_config_without_pretrained_cfg_reads(tmp_path):
    """Older Hub exports hold one flat dict (timm's _parse_model_cfg reads them): the rest is the pretrained_cfg."""
    folder = shutil.copytree(TIMM_FIXTURES / "vit_gap_like", tmp_path / "repo")
    config = json.loads((folder / "config.json").read_text())
    flat = dict(config["pretrained_cfg"], architecture=config["architecture"], num_classes=5)
    (folder / "config.json").write_text(json.dumps(flat))
    checkpoint = read_timm(folder, model_args=dict(embed_dim=48, depth=2, num_heads=3))
    assert checkpoint.arguments == read_timm(TIMM_FIXTURES / "vit_gap_like").arguments
    assert checkpoint.preprocessing["input_size"] == (32, 32)


def test_arrays_of_no_known_part_are_refused():
    state = load_file(TIMM_FIXTURES / "vit_augreg_like" / "model.safetensors")
    state["dist_token"] = np.zeros((1, 1, 48))
    with pytest.raises(UnknownArraysError) as error:
        to_official(state, num_heads=3)
    assert error.value.unknown == ["dist_token"]


def test_a_caller_check_sees_official_headers_before_anything_is_read(unread):
    seen = {}

    def check(headers):
        seen.update(headers)
        raise ValueError("too large for this model")

    with pytest.raises(ValueError, match="too large"):
        read_timm(TIMM_FIXTURES / "vit_siglip_map_like", check=check)
    assert seen["MAPHead_0/MultiHeadDotProductAttention_0/key/kernel"].shape == (48, 3, 16)
    assert seen["embedding/kernel"].nbytes == 16 * 16 * 3 * 48 * 4


# --- Hub ids: the Hugging Face cache, else a download ---

REPO_ID = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


def _hf_cache(root, repo, fixture, revision="main", commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache tree as huggingface_hub writes it: blobs, snapshot symlinks, refs."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        blob = folder / "blobs" / name.replace(".", "_")
        shutil.copy(TIMM_FIXTURES / fixture / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Empty caches and an endpoint where nothing listens."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "keras-vit-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_a_hub_id_resolves_from_the_hugging_face_cache(tmp_path, monkeypatch, no_hub):
    _hf_cache(tmp_path / "hf", REPO_ID, "vit_siglip_map_like")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    checkpoint = read_timm(f"hf-hub:{REPO_ID}")
    folder = read_timm(TIMM_FIXTURES / "vit_siglip_map_like")
    assert checkpoint.arguments == folder.arguments and checkpoint.label == f"hf-hub:{REPO_ID}"
    assert all(np.array_equal(checkpoint.arrays[k], folder.arrays[k]) for k in folder.arrays)


def test_hf_home_and_pinned_revisions(tmp_path, monkeypatch, no_hub):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    commit = _hf_cache(tmp_path / "home" / "hub", REPO_ID, "vit_gap_like", revision="v1")
    weights, config = hub.resolve(f"hf_hub:{REPO_ID}@v1")
    assert weights.parent.name == commit and config.name == "config.json"
    assert hub.resolve(f"hf-hub:{REPO_ID}@{commit}") == (weights, config)
    with pytest.raises(ConnectionError):  # the main branch is not cached, and nothing listens at the endpoint
        hub.resolve(f"hf-hub:{REPO_ID}")


@pytest.mark.parametrize("hub_id", ["hf-hub:timm/../secrets", "hf-hub:../../etc/passwd", "hf-hub:timm/x@../../y",
                                    "hf-hub:timm", "hf-hub:a/b/c", "hf-hub:timm/x--y"])
def test_hub_ids_that_could_escape_the_cache_are_refused(hub_id):
    with pytest.raises(ValueError, match="not a Hugging Face Hub id"):
        hub.parse_hub_id(hub_id)


def _serve(routes):
    """A local HTTP server of ``routes`` {path: (status, headers, body)}; yields its address and the paths asked."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}", requests


def _hub_routes(weights, config, announced):
    """A Hub repository REPO_ID at main, as huggingface.co serves it: config.json directly (a Git blob, whose ETag
    is no SHA-256), model.safetensors by a redirect to its storage that announces ``announced`` in X-Linked-Etag."""
    base = f"/{REPO_ID}/resolve/main"
    return {
        f"{base}/config.json": (200, {"ETag": '"' + "a" * 40 + '"'}, config),
        f"{base}/model.safetensors": (302, {"Location": "/lfs-storage/blob", "X-Linked-Etag": f'"{announced}"',
                                           "ETag": f'"{announced}"'}, b""),
        "/lfs-storage/blob": (200, {"Content-Type": "application/octet-stream"}, weights),
    }


@pytest.fixture
def hub_server():
    """A local Hub: serves the fixture vit_dinov2_like as REPO_ID at main; counts the requests."""
    weights, config = ((TIMM_FIXTURES / "vit_dinov2_like" / name).read_bytes()
                       for name in ("model.safetensors", "config.json"))
    httpd, address, requests = _serve(_hub_routes(weights, config, hashlib.sha256(weights).hexdigest()))
    yield address, requests
    httpd.shutdown()
    httpd.server_close()


def test_a_hub_id_downloads_when_not_cached(hub_server, no_hub, monkeypatch, tmp_path):
    endpoint, requests = hub_server
    checkpoint = read_timm(f"hf-hub:{REPO_ID}", endpoint=endpoint)
    folder = read_timm(TIMM_FIXTURES / "vit_dinov2_like")
    assert checkpoint.arguments == folder.arguments
    assert all(np.array_equal(checkpoint.arrays[k], folder.arrays[k]) for k in folder.arrays)
    assert len(requests) == 3  # config.json, the redirect, the storage
    cached = sorted(p.name for p in (tmp_path / "keras-vit-cache").iterdir())
    stem = REPO_ID.replace("/", "--")
    assert [name.rsplit("--", 1)[0] for name in cached] == [f"{stem}--config", f"{stem}--model"], cached
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # the variable huggingface_hub reads; the files are cached now
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    read_timm(f"hf-hub:{REPO_ID}")
    assert len(requests) == 3


def test_a_download_that_is_not_what_the_hub_announced_is_deleted(no_hub, tmp_path):
    weights = (TIMM_FIXTURES / "vit_dinov2_like" / "model.safetensors").read_bytes()
    config = (TIMM_FIXTURES / "vit_dinov2_like" / "config.json").read_bytes()
    httpd, endpoint, _ = _serve(_hub_routes(weights, config, "0" * 64))
    try:
        with pytest.raises(download.HashMismatchError) as refused:
            read_timm(f"hf-hub:{REPO_ID}", endpoint=endpoint)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert refused.value.expected == "0" * 64 and refused.value.found == hashlib.sha256(weights).hexdigest()
    assert refused.value.deleted and not any(p.suffix == ".safetensors" for p in (tmp_path / "keras-vit-cache").iterdir())


def test_a_safetensors_file_whose_header_length_starts_like_a_page_downloads(no_hub, tmp_path):
    """A header length whose low byte is 0x3C (``<``) once made the download look like a web page."""
    arrays = load_file(TIMM_FIXTURES / "vit_gap_like" / "model.safetensors")
    path = tmp_path / "model.safetensors"
    save_file(arrays, path)
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    padded = length + (0x3C - length) % 256
    data = struct.pack("<Q", padded) + data[8:8 + length] + b" " * (padded - length) + data[8 + length:]
    assert data[:1] == b"<"
    httpd, address, _ = _serve({"/x/model.safetensors": (200, {}, data), "/x/page.safetensors": (200, {}, b"<html>")})
    try:
        fetched = download.fetch(f"{address}/x/model.safetensors")
        with pytest.raises(ValueError, match="not the .safetensors expected"):
            download.fetch(f"{address}/x/page.safetensors")
    finally:
        httpd.shutdown()
        httpd.server_close()
    read = safetensors_file.read_safetensors(fetched)
    assert all(np.array_equal(read[k], arrays[k]) for k in arrays)


def test_offline_without_the_files_is_refused(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        read_timm(f"hf-hub:{REPO_ID}")


# --- timm's position-embedding resampling (resample_abs_pos_embed: PyTorch's antialiased bicubic) ---

@pytest.mark.parametrize("source, target, prefix", [((7, 7), (12, 12), 1), ((16, 16), (10, 10), 0),
                                                    ((37, 37), (16, 16), 5), ((5, 8), (9, 3), 1)])
def test_timm_posemb_resampling_is_pytorchs_antialiased_bicubic(source, target, prefix):
    torch = pytest.importorskip("torch")
    from keras_vit.pretrained.resample import resample_posemb_antialiased

    posemb = np.random.default_rng(0).normal(size=(1, prefix + source[0] * source[1], 6))
    grid = torch.from_numpy(posemb[:, prefix:]).reshape(1, *source, 6).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=target, mode="bicubic", antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(1, -1, 6).numpy()
    resampled = resample_posemb_antialiased(posemb, target, prefix, source)
    np.testing.assert_array_equal(resampled[:, :prefix], posemb[:, :prefix])
    np.testing.assert_allclose(resampled[:, prefix:], expected, atol=1e-12, rtol=0)


# --- preprocessing from pretrained_cfg ---

CLIP_INPUT = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                  interpolation="bicubic", crop_pct=0.95, crop_mode="center")


def test_preprocess_input_normalizes_as_the_weights_expect():
    from types import SimpleNamespace

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3)).astype("uint8")
    clip = keras.ops.convert_to_numpy(keras_vit.preprocess_input(pixels, model=SimpleNamespace(preprocessing=CLIP_INPUT)))
    expected = (pixels / 255.0 - np.array(CLIP_INPUT["mean"])) / np.array(CLIP_INPUT["std"])
    np.testing.assert_allclose(clip, expected, atol=2e-6, rtol=0)
    official = keras.ops.convert_to_numpy(keras_vit.preprocess_input(pixels, model=SimpleNamespace(preprocessing=None)))
    np.testing.assert_array_equal(official, keras.ops.convert_to_numpy(keras_vit.preprocess_input(pixels)))
    np.testing.assert_allclose(official, pixels / 127.5 - 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [dict(mean=(0.5, 0.5)), dict(std=0), dict(crop_pct=1.5), dict(interpolation="cubic"),
                                 dict(crop_mode="zoom"), dict(input_size=(3, 224, 224))])
def test_preprocessing_that_cannot_be_applied_is_refused(bad):
    from keras_vit.preprocessing import normalization

    with pytest.raises(ValueError, match="preprocessing"):
        normalization(bad, channels=3)


def test_timms_eval_resize_and_crop():
    """Pixel value = column index: a 40 x 60 image to 20 x 20 with crop_pct 0.5, "center": the shorter side is
    resized to 40 (nothing), the width stays 60, and the central 20 x 20 is kept, columns 20 to 39."""
    from keras_vit.preprocessing import resize_and_crop

    image = np.broadcast_to(np.arange(60, dtype="float32")[None, :, None], (40, 60, 1))
    settings = dict(interpolation="nearest", crop_pct=0.5, crop_mode="center")
    cropped = keras.ops.convert_to_numpy(resize_and_crop(image, (20, 20), settings))
    np.testing.assert_array_equal(cropped[0, :, 0], np.arange(20, 40))
    squashed = keras.ops.convert_to_numpy(resize_and_crop(image, (20, 20), dict(settings, crop_mode="squash")))
    # width 60 -> 40 (nearest, half-pixel centres: column i reads floor((i + 0.5) * 1.5)), then columns 10 to 29
    np.testing.assert_array_equal(squashed[0, :, 0], np.floor((np.arange(10, 30) + 0.5) * 1.5))


# --- the registry's timm rows ---

def test_timm_families_resolve_to_hub_ids_of_covered_entry_points():
    from keras_vit.pretrained import registry

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert registry.timm_weights_table() in readme
    hub_entries = [(model, family, e) for (model, family), es in registry.REGISTRY.items() for e in es if e.is_hub]
    assert len(hub_entries) >= 30
    for model, family, entry in hub_entries:
        assert model in keras_vit.list_models() and family in registry.FAMILIES
        architecture = entry.path.removeprefix("hf-hub:timm/").split(".")[0]
        arguments = timm_arguments(architecture)  # covered: no UnsupportedArchitectureError
        config = keras_vit.model_config(model)
        assert (arguments["embed_dim"], arguments["depth"], arguments["num_heads"]) == (
            config["hidden_size"], config["num_layers"], config["num_heads"])
        assert arguments["patch_size"] == config["patch_size"]
        # the size: in the entry point's name (timm takes it from pretrained_cfg's input_size; DINOv2's: 518)
        assert architecture.endswith(f"_{entry.resolution}") or (entry.resolution, family[:6]) == (518, "dinov2")
        assert entry.input_settings["interpolation"] == "bicubic" and (entry.classes is None) == (entry.top1 is None)
    entry = registry.resolve("ViT-L_14", "clip_openai_ft_in12k_in1k", 336)
    assert entry.url == "hf-hub:timm/vit_large_patch14_clip_336.openai_ft_in12k_in1k" and entry.top1 == 88.26
