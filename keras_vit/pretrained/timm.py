"""timm checkpoints: a Hub folder, a ``.safetensors`` file or a Hub id -> official arrays, the architecture they
hold (keras_vit builder arguments) and their preprocessing.

``read_timm`` reads a Hugging Face Hub repository of timm (``model.safetensors`` + ``config.json``): the
architecture comes from the files alone. The geometry is read off the arrays; what arrays cannot say (heads, GELU
form, norm epsilon, pooling, options) comes from the timm entry point named by ``config.json``'s ``architecture``
(``timm_entry_points.ENTRY_POINTS``), overridden by its ``model_args``. Config and arrays are checked against
each other; what keras_vit cannot build is an ``UnsupportedArchitectureError`` naming the missing part.

The builder arguments use these options besides the official ones: ``pre_norm`` (timm's ``norm_pre``, a
LayerNorm after the position embeddings; timm's patch embedding then has no bias), ``fc_norm`` (the norm after
pooling, in place of the final norm), ``layer_scale`` (timm's ``init_values``: LayerScale's initial value, or
None), ``qkv_bias``, ``qk_norm`` (LayerNorm per head on queries and keys), ``gelu`` ("erf", "tanh" or "quick":
x * sigmoid(1.702 x)), ``layer_norm_epsilon``, and ``posemb_class_token`` False for timm's ``no_embed_class``
(the table covers the grid only; True: every prefix token, class or register, has a row).
"""

import collections
import json
import os
from pathlib import Path

import numpy as np

from keras_vit.layers.common import to_pair
from keras_vit.pretrained import checks, hub
from keras_vit.pretrained.npz import ArrayHeader
from keras_vit.pretrained.resample import square_grid
from keras_vit.pretrained.safetensors_file import PICKLE_SUFFIXES, read_safetensors, refuse_pickle, tensor_headers
from keras_vit.pretrained.timm_entry_points import ENTRY_POINTS, OTHER_MODULES, TIMM_DEFAULTS, TIMM_VERSION
from keras_vit.pretrained.timm_names import BLOCK_KEY, to_official

TimmCheckpoint = collections.namedtuple("TimmCheckpoint", "arrays arguments preprocessing label")
TimmCheckpoint.__doc__ = (
    "Arrays keyed by official name, the keras_vit builder arguments of their architecture, the preprocessing of "
    "``pretrained_cfg`` (or None) and a label for messages."
)
MAX_CONFIG_BYTES = 1 << 20
TIMM_GELU = {"gelu": "erf", "gelu_tanh": "tanh", "quick_gelu": "quick"}  # timm act_layer -> keras_vit gelu
TIMM_POOLING = {"token": "token", "avg": "gap", "max": "max", "map": "map"}  # timm global_pool -> keras_vit pooling
# The builder arguments beyond the geometry that a timm checkpoint states (``infer_arguments``).
TIMM_OPTIONS = ("pre_norm", "fc_norm", "layer_scale", "qkv_bias", "qk_norm", "gelu", "layer_norm_epsilon",
                "dynamic_padding")
FC_NORM_POOLS = ("avg", "avgmax", "max")  # timm's fc_norm=None turns the norm after pooling on for these
_TRAINING_ONLY = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                  "drop_path_rate", "weight_init", "fix_init")  # training only: no effect on the outputs
_LACKING = (  # timm argument, the value keras_vit builds, what another value needs ({} is the value)
    ("block_fn", "Block", "parallel or post-norm blocks (block_fn={})"),
    ("mlp_layer", "Mlp", "a gated MLP (mlp_layer={})"),
    ("norm_layer", "layernorm", "RMSNorm or another norm (norm_layer={})"),
    ("embed_norm_layer", None, "a norm in the patch embedding (embed_norm_layer={})"),
    ("attn_layer", "", "differential attention (attn_layer={})"),
    ("scale_attn_norm", False, "a norm inside attention (scale_attn_norm={})"),
    ("scale_mlp_norm", False, "a norm inside the MLP (scale_mlp_norm={})"),
    ("proj_bias", True, "projections without biases (proj_bias={})"),
    ("final_norm", True, "a model without a final norm (final_norm={})"),
    ("pool_include_prefix", False, "pooling over the prefix tokens too (pool_include_prefix={})"),
    ("pos_embed", "learn", "position embeddings {} (pos_embed)"),
)
_ALIASES = {"attn_layer": {"attn": ""}, "norm_layer": {"LayerNorm": "layernorm"}}


class UnsupportedArchitectureError(ValueError):
    """A timm architecture keras_vit cannot build: ``architecture`` (the entry point) needs ``missing`` (a tuple
    of the parts keras_vit lacks, each with the timm argument that asks for it)."""

    def __init__(self, label, architecture, missing):
        self.architecture = architecture
        self.missing = tuple(missing)
        parts = ", ".join(self.missing[:-1]) + (" and " if len(self.missing) > 1 else "") + self.missing[-1]
        super().__init__(f"{label}: timm's {architecture} needs {parts}, which keras_vit cannot build.")


def timm_arguments(architecture, *overrides, label="The checkpoint"):
    """timm's ``VisionTransformer`` keyword arguments of entry point ``architecture``, then each of ``overrides``
    (dicts, e.g. ``config.json``'s ``model_args``) on top; refuses an entry point or argument keras_vit lacks."""
    if architecture not in ENTRY_POINTS:
        missing = next((lacking for pattern, lacking in OTHER_MODULES if pattern.search(architecture)),
                       f"to be an entry point of timm {TIMM_VERSION}'s vision_transformer.py")
        raise UnsupportedArchitectureError(label, architecture, [missing])
    arguments = {**TIMM_DEFAULTS, **ENTRY_POINTS[architecture]}
    for override in overrides:
        arguments.update(override or {})
    missing = [f"the timm argument {key}" for key in sorted(set(arguments) - set(TIMM_DEFAULTS) - set(_TRAINING_ONLY))]
    for key, built, lacking in _LACKING:
        value = arguments[key]
        value = _ALIASES.get(key, {}).get(value, value) if isinstance(value, str) else value
        if value != built:
            missing.append(lacking.format(repr(value)))
    if not isinstance(arguments["act_layer"], str) or arguments["act_layer"] not in TIMM_GELU:
        missing.append(f"the activation {arguments['act_layer']!r} (act_layer)")
    pool = arguments["global_pool"]
    if (not isinstance(pool, str) or pool not in TIMM_POOLING) and (pool or arguments["num_classes"]):
        missing.append(f"{pool!r} pooling (global_pool)")
    elif arguments["class_token"] and pool not in ("token", ""):
        missing.append(f"a class token beside {pool!r} pooling (class_token=True, global_pool={pool!r})")
    if missing:
        raise UnsupportedArchitectureError(label, architecture, missing)
    return arguments


def _mismatch(label, architecture, what, said, found):
    return ValueError(
        f"{label}: its config ({architecture}) says {what} {said}, but its arrays have {found}: the config does not "
        "describe these weights (correct it with model_args=)."
    )


def _grid(tokens, sizes, patch, label):
    """The position-embedding grid (gh, gw) of ``tokens`` rows: the first of ``sizes`` (image sizes, int or
    (height, width)) whose grid has as many cells, else a square."""
    for size in sizes:
        grid = tuple(side // step for side, step in zip(to_pair(size), patch))
        if grid[0] * grid[1] == tokens:
            return grid
    try:
        return square_grid(tokens)
    except ValueError:
        message = f"{label}: its {tokens} position embeddings form no grid of the config's image size."
        raise ValueError(message) from None


def _builder_arguments(timm, explicit, shapes, architecture, pretrained_cfg, label):
    """keras_vit builder arguments from timm arguments (merged; ``explicit``: those the config or caller set) and
    the arrays' shapes ``{timm name: shape}``."""
    try:
        dim, channels, *patch = shapes["patch_embed.proj.weight"]
        mlp_dim = shapes["blocks.0.mlp.fc1.weight"][0]
        posemb_rows = shapes["pos_embed"][1]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{label} is not a timm VisionTransformer: it lacks a 4-D patch_embed.proj.weight, "
                         "blocks.0.mlp.fc1.weight or pos_embed.") from None
    patch = tuple(patch)
    blocks = sorted({int(m[1]) for m in map(BLOCK_KEY.match, shapes) if m})
    registers = shapes["reg_token"][1] if "reg_token" in shapes else 0
    classes = shapes["head.weight"][0] if "head.weight" in shapes else 0
    found = {"embed_dim": dim, "depth": len(blocks), "patch_size": patch, "in_chans": channels,
             "reg_tokens": registers, "mlp_dim": mlp_dim, "num_classes": classes}
    said = dict(timm, patch_size=to_pair(timm["patch_size"]), mlp_dim=int(timm["embed_dim"] * timm["mlp_ratio"]))
    for key, value in found.items():
        if said[key] != value and (key != "num_classes" or key in explicit):
            raise _mismatch(label, architecture, key, said[key], value)
    if blocks != list(range(len(blocks))):
        raise ValueError(f"{label}: its blocks are numbered {blocks}, not 0 to {len(blocks) - 1}.")
    heads = timm["num_heads"]
    head_size = shapes.get("blocks.0.attn.q_norm.weight", (dim // heads,))[0]
    if dim % heads or head_size != dim // heads:
        raise _mismatch(label, architecture, "num_heads", heads, f"hidden size {dim} and head size {head_size}")
    posemb_class_token = not timm["no_embed_class"]
    prefix_rows = (int(timm["class_token"]) + registers) if posemb_class_token else 0
    sizes = ([timm["img_size"]] if "img_size" in explicit else []) + (
        [tuple(pretrained_cfg["input_size"][1:])] if pretrained_cfg.get("input_size") else [])
    grid = _grid(posemb_rows - prefix_rows, sizes, patch, label)
    pooling = TIMM_POOLING.get(timm["global_pool"])
    head = dict(include_top=True, classes=classes) if classes else dict(include_top=False, pooling=pooling)
    return dict(
        image_size=(grid[0] * patch[0], grid[1] * patch[1]), patch_size=patch, hidden_size=dim,
        num_layers=len(blocks), num_heads=heads, mlp_dim=mlp_dim, channels=channels,
        classifier="token" if timm["class_token"] else pooling or "unpooled", **head, representation_size=None,
        num_register_tokens=registers, posemb_class_token=posemb_class_token, pre_norm=bool(timm["pre_norm"]),
        fc_norm=timm["global_pool"] in FC_NORM_POOLS if timm["fc_norm"] is None else bool(timm["fc_norm"]),
        layer_scale=timm["init_values"] or None, qkv_bias=bool(timm["qkv_bias"]), qk_norm=bool(timm["qk_norm"]),
        gelu=TIMM_GELU[timm["act_layer"]], layer_norm_epsilon=float(timm["norm_eps"]),
        dynamic_padding=bool(timm["dynamic_img_pad"]),
    )


# timm array -> whether builder arguments call for it (a mismatch means the config describes other weights)
_PRESENCE = (
    ("norm_pre.weight", lambda a: a["pre_norm"], "pre_norm"),
    ("patch_embed.proj.bias", lambda a: not a["pre_norm"], "a patch-embedding bias (timm drops it with pre_norm)"),
    ("fc_norm.weight", lambda a: a["fc_norm"], "fc_norm"),
    ("norm.weight", lambda a: not a["fc_norm"], "a final norm before pooling"),
    ("blocks.0.ls1.gamma", lambda a: a["layer_scale"] is not None, "layer_scale"),
    ("blocks.0.attn.qkv.bias", lambda a: a["qkv_bias"], "qkv_bias"),
    ("blocks.0.attn.q_norm.weight", lambda a: a["qk_norm"], "qk_norm"),
    ("cls_token", lambda a: a["classifier"] == "token", "a class token"),
    ("attn_pool.latent", lambda a: a["classifier"] == "map", "MAP pooling (attn_pool)"),
)


def infer_arguments(architecture, shapes, *overrides, pretrained_cfg=None, label="The checkpoint"):
    """keras_vit builder arguments of a timm state dict's shapes ``{timm name: shape}`` and entry point
    ``architecture`` with ``overrides`` (``model_args`` dicts) on top.

    Returns image_size, patch_size, hidden_size, num_layers, num_heads, mlp_dim, channels, classifier,
    include_top with classes (a head) or pooling (headless: the pooled output), representation_size (None:
    timm drops it), num_register_tokens, posemb_class_token, pre_norm, fc_norm, layer_scale, qkv_bias, qk_norm,
    gelu, layer_norm_epsilon, dynamic_padding. The arrays must agree with the config (``ValueError`` naming what
    differs); what keras_vit lacks is an ``UnsupportedArchitectureError``.
    """
    timm = timm_arguments(architecture, *overrides, label=label)
    explicit = {key for override in overrides for key in (override or {})}
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    arguments = _builder_arguments(timm, explicit, shapes, architecture, pretrained_cfg or {}, label)
    for name, wanted, what in _PRESENCE:
        if wanted(arguments) != (name in shapes):
            state = ("has", "lacks") if wanted(arguments) else ("has no", "holds")
            raise ValueError(f"{label}: its config ({architecture}) {state[0]} {what}, but the file {state[1]} "
                             f"{name}: the config does not describe these weights (correct it with model_args=).")
    return arguments


def preprocessing(pretrained_cfg):
    """The input pipeline of ``pretrained_cfg``: mean, std (per channel), interpolation, crop_pct, crop_mode and
    input_size (height, width), those it gives; None without a ``pretrained_cfg``."""
    if not pretrained_cfg:
        return None
    found = {key: pretrained_cfg[key] for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode")
             if pretrained_cfg.get(key) is not None}
    for key in ("mean", "std"):
        if key in found:
            found[key] = tuple(float(v) for v in found[key])
    if pretrained_cfg.get("input_size"):
        found["input_size"] = tuple(int(v) for v in pretrained_cfg["input_size"][1:])
    return found


def read_config(path):
    """``(architecture, model_args, pretrained_cfg)`` of a timm ``config.json`` (the top-level ``num_classes``
    counts as a model argument, as timm reads it); ``ValueError`` for a file that is not one."""
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a timm config.json.")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON file ({error}): not a timm config.json.") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ValueError(f"{path} names no architecture: not a timm config.json.")
    pretrained_cfg = config.get("pretrained_cfg", {key: v for key, v in config.items() if key != "architecture"})
    model_args = dict(config.get("model_args") or {})
    if "num_classes" in config:
        model_args = {"num_classes": config["num_classes"], **model_args}
    return config["architecture"], model_args, pretrained_cfg


def timm_files(source, endpoint=None):
    """``(model.safetensors path, config.json path or None)`` of a Hub id, a folder or a ``.safetensors`` file
    (its ``config.json`` when it is a folder's ``model.safetensors``); PyTorch pickles are refused."""
    if hub.is_hub_id(source):
        return hub.resolve(source, endpoint)
    path = Path(source)
    if path.is_dir():
        weights = path / hub.WEIGHTS_NAME
        if not weights.is_file():
            for pickled in sorted(p for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)):
                refuse_pickle(pickled)
            raise FileNotFoundError(f"{path} holds no {hub.WEIGHTS_NAME}: it is not a Hugging Face Hub folder of timm.")
        config = path / hub.CONFIG_NAME
        return weights, config if config.is_file() else None
    refuse_pickle(path)
    config = path.parent / hub.CONFIG_NAME
    return path, config if path.name == hub.WEIGHTS_NAME and config.is_file() else None


def _stand_ins(headers):
    """Zero-stride stand-ins of the arrays ``headers`` describe, in their dtypes (no memory)."""
    return {name: np.broadcast_to(np.zeros((), header.dtype), header.shape) for name, header in headers.items()}


def read_timm(source, architecture=None, model_args=None, check=None, allow_nonfinite=False, endpoint=None):
    """Reads a timm checkpoint into a ``TimmCheckpoint`` (official arrays, builder arguments, preprocessing).

    ``source``: a Hub id ``hf-hub:timm/<architecture>.<tag>`` (``hub.resolve``: the Hugging Face cache, else a
    download from ``endpoint``), a folder holding ``model.safetensors`` and ``config.json``, or a
    ``.safetensors`` file (a bare one needs ``architecture``, the timm entry point). ``architecture`` and
    ``model_args`` override the config's. Everything is checked before the arrays are read: the header against
    the file (``safetensors_file.tensor_headers``), config against arrays (``infer_arguments``), the arrays'
    official shapes against each other (``checks.check_consistent``), then ``check({official name:
    ArrayHeader})`` when given (it raises to refuse). Arrays with NaN or infinite values are refused unless
    ``allow_nonfinite=True``. PyTorch pickles are refused unread.
    """
    weights, config_path = timm_files(source, endpoint)
    label = source if hub.is_hub_id(source) else os.fspath(weights)
    config_architecture, config_args, pretrained_cfg = read_config(config_path) if config_path else (None, {}, None)
    architecture = architecture or config_architecture
    if architecture is None:
        raise ValueError(f"{label} has no config.json beside it: pass architecture=, its timm entry point "
                         "(e.g. 'vit_base_patch16_224'), or the folder that holds both files.")
    headers = tensor_headers(weights)
    shapes = {name: header.shape for name, header in headers.items()}
    arguments = infer_arguments(architecture, shapes, config_args, model_args, pretrained_cfg=pretrained_cfg,
                                label=label)
    official = to_official(_stand_ins(headers), arguments["num_heads"], label)
    checks.check_consistent({name: array.shape for name, array in official.items()}, label)
    if check is not None:
        check({name: ArrayHeader(a.shape, a.dtype, a.size * a.dtype.itemsize) for name, a in official.items()})
    arrays = read_safetensors(weights)
    if not allow_nonfinite:
        checks.check_finite(arrays, label)
    return TimmCheckpoint(to_official(arrays, arguments["num_heads"], label), arguments,
                          preprocessing(pretrained_cfg), label)
