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

from keras_vit.layers.heads import OFFICIAL_SCOPE as MAP_SCOPE
from keras_vit.layers.tokens import PREFIX_TOKENS
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
    """A state dict holds arrays no rule converts (``unknown``: their timm names)."""

    def __init__(self, label, unknown):
        self.unknown = sorted(unknown)
        more = len(self.unknown) - _LISTED
        listed = ", ".join(self.unknown[:_LISTED]) + (f" and {more} more" if more > 0 else "")
        super().__init__(
            f"{label} holds arrays of no timm VisionTransformer part keras_vit reads: {listed}. It is another "
            "architecture (or a part keras_vit lacks); see keras_vit.pretrained.timm_entry_points."
        )


def _per_head(name, array, heads):
    """(D_out, D_in) -> (D_in, N, dh): a query / key / value weight; (D_out,) -> (N, dh): its bias."""
    if array.shape[0] % heads:
        raise ValueError(f"{name} has {array.shape[0]} output rows, not a multiple of the {heads} heads.")
    if array.ndim == 1:
        return array.reshape(heads, -1)
    return array.T.reshape(array.shape[1], heads, -1)


def _layout(kind, scope, parameter, name, array, heads):
    """``{official name: array}`` of one timm parameter (``parameter``: weight, bias or gamma) of a ``kind`` module."""
    official = {"weight": "scale" if kind == "norm" else "kernel", "bias": "bias", "gamma": "scale"}[parameter]
    if kind in _FUSED:
        parts = _FUSED[kind]
        if array.shape[0] % len(parts):
            raise ValueError(f"{name} has {array.shape[0]} output rows, not {len(parts)} fused projections.")
        thirds = array.reshape(len(parts), -1, *array.shape[1:])
        return {f"{scope}/{part}/{official}": _per_head(name, third, heads) for part, third in zip(parts, thirds)}
    if kind == "heads_in":
        return {f"{scope}/{official}": _per_head(name, array, heads)}
    if kind == "heads_out" and parameter == "weight":  # (D, D_in) -> (N, dh, D)
        if array.shape[1] % heads:
            raise ValueError(f"{name} has {array.shape[1]} input columns, not a multiple of the {heads} heads.")
        return {f"{scope}/kernel": array.T.reshape(heads, -1, array.shape[0])}
    if kind == "conv" and parameter == "weight":  # (D, C, ph, pw) -> (ph, pw, C, D)
        return {f"{scope}/kernel": array.transpose(2, 3, 1, 0)}
    if kind == "dense" and parameter == "weight":  # (out, in) -> (in, out)
        return {f"{scope}/kernel": array.T}
    return {f"{scope}/{official}": array}


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
