"""timm's ``VisionTransformer`` state dict in official names and layouts, and the official names of timm's extras.

timm keeps PyTorch layouts: ``nn.Linear`` weights (out, in), the patch convolution (D, C, ph, pw), the attention's
query, key and value fused in one ``qkv`` (3D, D) (the MAP head's key and value in one ``kv`` (2D, D)).
``to_official`` rewrites them as the official checkpoints hold them: Dense kernels (in, out), the patch kernel
(ph, pw, C, D), query / key / value kernels (D, N, dh) with biases (N, dh), the output kernel (N, dh, D). It is
timm's own ``_load_weights`` (official ``.npz`` -> timm) run backwards. Every rule is a line of ``_TOP`` or
``_BLOCK`` (timm module -> official scope and layout kind) or ``_PARAMETERS``.

Parts the official code lacks get official-style names here (``OFFICIAL_EXTRAS``); the model side declares its
layers' weights under these names. Shapes: D = hidden size, N = heads, dh = D / N, M = MLP size, K = classes.
"""

import re

import numpy as np

from keras_vit.layers.heads import OFFICIAL_SCOPE as MAP_SCOPE
from keras_vit.layers.tokens import PREFIX_TOKENS
from keras_vit.pretrained.names import BLOCK_KEY as NAMES_BLOCK_KEY
from keras_vit.pretrained.names import POSEMB

# Official-style names of timm's extras, with their shapes (declared once here).
PRE_NORM = "Transformer/pre_norm"  # timm norm_pre: LayerNorm after the position embeddings; scale, bias (D,)
FC_NORM = "fc_norm"  # timm fc_norm: LayerNorm after pooling, in place of encoder_norm; scale, bias (D,)
LAYER_SCALE = ("LayerScale_0", "LayerScale_1")  # in a block, after attention (ls1) and after the MLP (ls2); scale (D,)
QK_NORM = ("query_ln", "key_ln")  # in a block's attention (Flax's normalize_qk names); scale, bias (dh,)
OFFICIAL_EXTRAS = {
    "pre_norm": (f"{PRE_NORM}/scale", f"{PRE_NORM}/bias"),
    "fc_norm": (f"{FC_NORM}/scale", f"{FC_NORM}/bias"),
    "layer_scale": tuple(f"Transformer/encoderblock_{{i}}/{scope}/scale" for scope in LAYER_SCALE),
    "qk_norm": tuple(f"Transformer/encoderblock_{{i}}/MultiHeadDotProductAttention_1/{scope}/{part}"
                     for scope in QK_NORM for part in ("scale", "bias")),
}

_ATTENTION = "MultiHeadDotProductAttention_1"
_MAP_ATTENTION = f"{MAP_SCOPE}/MultiHeadDotProductAttention_0"
# timm module -> (official scope, layout kind); block modules are relative to Transformer/encoderblock_{i}.
_TOP = {
    "patch_embed.proj": ("embedding", "conv"),
    "norm_pre": (PRE_NORM, "norm"),
    "norm": ("Transformer/encoder_norm", "norm"),
    "fc_norm": (FC_NORM, "norm"),
    "head": ("head", "dense"),
    "attn_pool.q": (f"{_MAP_ATTENTION}/query", "heads_in"),
    "attn_pool.kv": (_MAP_ATTENTION, "kv"),
    "attn_pool.proj": (f"{_MAP_ATTENTION}/out", "heads_out"),
    "attn_pool.norm": (f"{MAP_SCOPE}/LayerNorm_0", "norm"),
    "attn_pool.mlp.fc1": (f"{MAP_SCOPE}/MlpBlock_0/Dense_0", "dense"),
    "attn_pool.mlp.fc2": (f"{MAP_SCOPE}/MlpBlock_0/Dense_1", "dense"),
}
_BLOCK = {
    "norm1": ("LayerNorm_0", "norm"),
    "attn.qkv": (_ATTENTION, "qkv"),
    "attn.q_norm": (f"{_ATTENTION}/{QK_NORM[0]}", "norm"),
    "attn.k_norm": (f"{_ATTENTION}/{QK_NORM[1]}", "norm"),
    "attn.proj": (f"{_ATTENTION}/out", "heads_out"),
    "ls1": (LAYER_SCALE[0], "scale"),
    "norm2": ("LayerNorm_2", "norm"),
    "mlp.fc1": ("MlpBlock_3/Dense_0", "dense"),
    "mlp.fc2": ("MlpBlock_3/Dense_1", "dense"),
    "ls2": (LAYER_SCALE[1], "scale"),
}
_PARAMETERS = {  # timm parameters kept as they are: (1, 1, D), (1, K, D), (1, rows, D), (1, 1, D)
    "cls_token": PREFIX_TOKENS["class"].official_name,
    "reg_token": PREFIX_TOKENS["register"].official_name,
    "pos_embed": POSEMB,
    "attn_pool.latent": f"{MAP_SCOPE}/probe",
}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}
_LISTED = 5


class UnknownArraysError(ValueError):
    """Arrays no rule converts (``unknown``: their names, timm's or, with ``official=True``, the official ones)."""

    def __init__(self, label, unknown, official=False):
        self.unknown = sorted(unknown)
        more = len(self.unknown) - _LISTED
        listed = ", ".join(self.unknown[:_LISTED]) + (f" and {more} more" if more > 0 else "")
        if official:
            message = f"{label} has weights no part of timm's VisionTransformer holds: {listed}."
        else:
            message = (f"{label} holds arrays of no timm VisionTransformer part keras_vit reads: {listed}. It is "
                       "another architecture (or a part keras_vit lacks); see keras_vit.pretrained.timm_entry_points.")
        super().__init__(message)


def _per_head(name, array, heads):
    """(D_out, D_in) -> (D_in, N, dh): a query / key / value weight; (D_out,) -> (N, dh): its bias."""
    if array.shape[0] % heads:
        raise ValueError(f"{name} has {array.shape[0]} output rows, not a multiple of the {heads} heads.")
    if array.ndim == 1:
        return array.reshape(heads, -1)
    return array.T.reshape(array.shape[1], heads, -1)


def _from_heads(array):
    """The inverse of ``_per_head``: (D_in, N, dh) -> (D_out, D_in); (N, dh) -> (D_out,)."""
    if array.ndim == 2:
        return array.reshape(-1)
    return array.reshape(array.shape[0], -1).T


def _heads_out(name, array, heads):
    """(D, D_in) -> (N, dh, D): the attention's output projection weight."""
    if array.shape[1] % heads:
        raise ValueError(f"{name} has {array.shape[1]} input columns, not a multiple of the {heads} heads.")
    return array.T.reshape(heads, -1, array.shape[0])


# layout kind -> (timm -> official, official -> timm) of a module's weight (of its bias: _BIAS_LAYOUTS); arrays of
# kinds not listed are kept as they are.
_WEIGHT_LAYOUTS = {
    "heads_in": (_per_head, _from_heads),
    "heads_out": (_heads_out, lambda kernel: kernel.reshape(-1, kernel.shape[-1]).T),  # (N, dh, D) -> (D, D_in)
    "conv": (lambda name, w, heads: w.transpose(2, 3, 1, 0), lambda kernel: kernel.transpose(3, 2, 0, 1)),
    "dense": (lambda name, w, heads: w.T, lambda kernel: kernel.T),  # (out, in) <-> (in, out)
}
_BIAS_LAYOUTS = {"heads_in": (_per_head, _from_heads)}  # a per-head bias (D,) <-> (N, dh)
_PARAMETER_NAMES = {"weight": "kernel", "bias": "bias", "gamma": "scale"}  # a norm's weight is its scale


def _official_names(kind, scope, parameter):
    """The official names of a timm parameter (``weight``, ``bias``, ``gamma``) of a ``kind`` module at ``scope``:
    one, or one per fused projection."""
    official = "scale" if kind == "norm" and parameter == "weight" else _PARAMETER_NAMES[parameter]
    return [f"{scope}/{part}/{official}" for part in _FUSED[kind]] if kind in _FUSED else [f"{scope}/{official}"]


def _transforms(kind, parameter):
    """``(to official, to timm)`` of one array of a ``kind`` module's ``parameter`` (fused parts: of each part)."""
    part_kind = "heads_in" if kind in _FUSED else kind
    table = _WEIGHT_LAYOUTS if parameter == "weight" else _BIAS_LAYOUTS
    return table.get(part_kind, (lambda name, array, heads: array, lambda array: array))


def _layout(kind, scope, parameter, name, array, heads):
    """``{official name: array}`` of one timm parameter (``parameter``: weight, bias or gamma) of a ``kind`` module."""
    names = _official_names(kind, scope, parameter)
    if array.shape[0] % len(names):
        raise ValueError(f"{name} has {array.shape[0]} output rows, not {len(names)} fused projections.")
    parts = array.reshape(len(names), -1, *array.shape[1:]) if kind in _FUSED else [array]
    forward = _transforms(kind, parameter)[0]
    return {official: forward(name, part, heads) for official, part in zip(names, parts)}


def _rule(name):
    """``(official scope, kind, parameter)`` of a timm parameter name, or None when no rule covers it."""
    block = BLOCK_KEY.match(name)
    module, _, parameter = (block[2] if block else name).rpartition(".")
    rule = (_BLOCK if block else _TOP).get(module)
    if rule is None or parameter not in ("weight", "bias", "gamma"):
        return None
    scope, kind = rule
    return (f"Transformer/encoderblock_{int(block[1])}/{scope}" if block else scope), kind, parameter


def to_official(state, num_heads, label="The checkpoint"):
    """``{official name: array}`` of a timm ``VisionTransformer`` state dict ``{timm name: array}``.

    ``num_heads`` splits the fused projections per head (it is not readable from them). Arrays are views or
    copies in their own dtype; zero-stride stand-ins (``npz.stand_ins``) stay zero-stride, so shapes alone can be
    converted before anything is read. A name no rule covers is an ``UnknownArraysError`` listing them all.
    """
    official, unknown = {}, []
    for name, array in state.items():
        if name in _PARAMETERS:
            official[_PARAMETERS[name]] = array
            continue
        rule = _rule(name)
        if rule is None:
            unknown.append(name)
            continue
        official.update(_layout(rule[1], rule[0], rule[2], name, array, num_heads))
    if unknown:
        raise UnknownArraysError(label, unknown)
    return official


def _modules(blocks):
    """Every ``(timm module, official scope, kind)`` of a model with ``blocks`` encoder blocks, from the tables."""
    yield from ((module, scope, kind) for module, (scope, kind) in _TOP.items())
    for i in range(blocks):
        for module, (scope, kind) in _BLOCK.items():
            yield f"blocks.{i}.{module}", f"Transformer/encoderblock_{i}/{scope}", kind


def from_official(arrays, label="The model"):
    """The timm ``VisionTransformer`` state dict ``{timm name: array}`` of official arrays: ``to_official`` run
    backwards, rule by rule from the same tables.

    Fused projections are concatenated back (query, key, value -> ``qkv`` (3D, D)); per-head shapes flatten
    back, so no head count is needed. An official array no rule covers (a hybrid's ResNet stem, ``pre_logits``) is an
    ``UnknownArraysError`` listing them all; a fused projection with a part missing is a ``ValueError``.
    """
    blocks = len({m[1] for m in map(NAMES_BLOCK_KEY.match, arrays) if m})
    state, used = {}, set()
    for timm_name, official in _PARAMETERS.items():
        if official in arrays:
            state[timm_name] = arrays[official]
            used.add(official)
    for module, scope, kind in _modules(blocks):
        for parameter in ("gamma",) if kind == "scale" else ("weight", "bias"):
            names = _official_names(kind, scope, parameter)
            present = [name for name in names if name in arrays]
            if not present:
                continue
            if len(present) < len(names):
                missing = sorted(set(names) - set(present))
                raise ValueError(f"{label} has {', '.join(present)} without {', '.join(missing)}: timm fuses them.")
            backward = _transforms(kind, parameter)[1]
            parts = [backward(arrays[name]) for name in names]
            state[f"{module}.{parameter}"] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            used.update(names)
    unknown = set(arrays) - used
    if unknown:
        raise UnknownArraysError(label, unknown, official=True)
    return state
