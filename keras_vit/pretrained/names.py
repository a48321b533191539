"""Official checkpoint names: canonical spelling, and the strict one-to-one match with a model.

Names are the Flax module path joined with ``/`` (e.g.
``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``). Encoder blocks use
the pre-Linen numbering (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
``LayerNorm_2``, ``MlpBlock_3``); files written by the Linen code use
``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
``MlpBlock_0``. Both are accepted, as are ``opt/target/`` and ``params/``
prefixes.

``official_variables`` is the name mapping between a keras_vit model and the
official tree; it reads the model's layers (by class and official layer
name), so that it also serves functional models saved by keras_vit versions
before ``VisionTransformer`` existed.
"""

import re

import keras

from keras_vit.layers import AddPositionEmbs, ClassToken, Patches, TransformerBlock
from keras_vit.pretrained.npz import decode_array
from keras_vit.resnet import ResNetStage, StdConv2D

_PREFIXES = ("opt/target/", "params/")
_OPTIMIZER_STATE = "opt/state/"  # a full Flax optimizer checkpoint: moments, not parameters
# Linen submodule name -> pre-Linen name, inside an encoder block.
_LINEN_TO_PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUP_NORM_KEY = re.compile(r"(^|/)gn(_root|_proj|\d+)/(scale|bias)$")
BLOCK_KEY = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)/(.*)$")
UNIT_KEY = re.compile(r"^block(\d+)/unit(\d+)/")
POSEMB = "Transformer/posembed_input/pos_embedding"
_LISTED = 5  # names shown per kind in a mismatch message


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not match the model's weights one to one.

    ``missing``, ``unexpected`` and ``mis_shaped`` hold the full lists; the
    message says first what the file and the model are (when known), then
    the counts and a few names of each kind, and last what to do (``advice``,
    by default: build the model with the checkpoint's architecture).
    """

    def __init__(self, source, missing=(), unexpected=(), mis_shaped=(), summary=None, advice=None):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mis_shaped = sorted(mis_shaped)
        lines = [f"Checkpoint {source} does not match the model" + (f": {summary}." if summary else ".")]

        def some(items):
            return ", ".join(items[:_LISTED]) + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")

        if self.missing:
            lines.append(f"Missing from the checkpoint ({len(self.missing)}): {some(self.missing)}")
        if self.unexpected:
            lines.append(f"Not used by the model ({len(self.unexpected)}): {some(self.unexpected)}")
        if self.mis_shaped:
            shapes = [f"{name}: {ckpt} vs {model}" for name, ckpt, model in self.mis_shaped]
            lines.append(f"Shape mismatch ({len(shapes)}), name: checkpoint vs model: {some(shapes)}")
        lines.append(
            advice
            or "Build the model with the checkpoint's architecture and resolution "
            "(keras_vit.from_official_checkpoint infers it from the file)."
        )
        super().__init__("\n".join(lines))


def normalize_names(arrays):
    """Maps checkpoint arrays to the canonical (released, pre-Linen) names and float arrays.

    Strips ``opt/target/`` and ``params/`` prefixes, drops optimizer state
    (``opt/state/...``), renames Linen block
    submodules to their pre-Linen names, widens bfloat16 bit patterns and
    flattens GroupNorm parameters stored as (1, 1, 1, C) to (C,). Returns a new dict.
    """
    stripped = {}
    for name, array in arrays.items():
        if name.startswith(_OPTIMIZER_STATE):
            continue
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        array = decode_array(array)
        if _GROUP_NORM_KEY.search(name) and array.ndim == 4:
            array = array.reshape(-1)
        stripped[name] = array
    linen_blocks = {
        m[1] for m in map(BLOCK_KEY.match, stripped) if m and m[2] in ("MultiHeadDotProductAttention_0", "MlpBlock_0")
    }
    normalized = {}
    for name, array in stripped.items():
        match = BLOCK_KEY.match(name)
        if match and match[1] in linen_blocks:
            name = f"{match[1]}/{_LINEN_TO_PRE_LINEN.get(match[2], match[2])}/{match[3]}"
        normalized[name] = array
    return normalized


def mismatch(shapes, arrays):
    """``(missing, unexpected, mis_shaped)`` of ``arrays`` against ``shapes`` ({official name: shape})."""
    missing = set(shapes) - set(arrays)
    unexpected = set(arrays) - set(shapes)
    mis_shaped = [
        (name, tuple(arrays[name].shape), tuple(shapes[name]))
        for name in set(shapes) & set(arrays)
        if tuple(arrays[name].shape) != tuple(shapes[name])
    ]
    return missing, unexpected, mis_shaped


def _block_variables(block):
    attention = block.attention
    variables = {
        "LayerNorm_0/scale": block.norm_attention.gamma,
        "LayerNorm_0/bias": block.norm_attention.beta,
        "LayerNorm_2/scale": block.norm_mlp.gamma,
        "LayerNorm_2/bias": block.norm_mlp.beta,
        "MlpBlock_3/Dense_0/kernel": block.mlp_in.kernel,
        "MlpBlock_3/Dense_0/bias": block.mlp_in.bias,
        "MlpBlock_3/Dense_1/kernel": block.mlp_out.kernel,
        "MlpBlock_3/Dense_1/bias": block.mlp_out.bias,
    }
    for part in ("query", "key", "value", "out"):
        variables[f"MultiHeadDotProductAttention_1/{part}/kernel"] = getattr(attention, f"{part}_kernel")
        variables[f"MultiHeadDotProductAttention_1/{part}/bias"] = getattr(attention, f"{part}_bias")
    return variables


def _norm_variables(prefix, layer):
    return {f"{prefix}/scale": layer.gamma, f"{prefix}/bias": layer.beta}


def _stage_variables(stage):
    """``blockS/unitU/{conv1,conv2,conv3,conv_proj}/kernel`` and ``gn*/{scale,bias}`` of a ResNet stage."""
    variables = {}
    for unit in stage.units:
        prefix = f"{stage.name}/{unit.name}"
        for conv, norm in ((unit.conv1, unit.gn1), (unit.conv2, unit.gn2), (unit.conv3, unit.gn3), (unit.conv_proj, unit.gn_proj)):
            if conv is not None:
                variables[f"{prefix}/{conv.name}/kernel"] = conv.kernel
                variables.update(_norm_variables(f"{prefix}/{norm.name}", norm))
    return variables


def _layer_variables(layer):
    """{official name: variable} of one layer of a keras_vit model; None for a layer with no counterpart."""
    if isinstance(layer, Patches):
        return {"embedding/kernel": layer.kernel, "embedding/bias": layer.bias}
    if isinstance(layer, ClassToken):
        return {"cls": layer.cls}
    if isinstance(layer, AddPositionEmbs):
        return {POSEMB: layer.pos_embedding}
    if isinstance(layer, TransformerBlock):
        return {f"Transformer/{layer.name}/{k}": v for k, v in _block_variables(layer).items()}
    if isinstance(layer, StdConv2D) and layer.name == "conv_root":
        return {"conv_root/kernel": layer.kernel}
    if isinstance(layer, keras.layers.GroupNormalization) and layer.name == "gn_root":
        return _norm_variables("gn_root", layer)
    if isinstance(layer, ResNetStage):
        return _stage_variables(layer)
    if isinstance(layer, keras.layers.LayerNormalization) and layer.name == "encoder_norm":
        return _norm_variables("Transformer/encoder_norm", layer)
    if isinstance(layer, keras.layers.Dense) and layer.name in ("pre_logits", "head"):
        return {f"{layer.name}/kernel": layer.kernel, f"{layer.name}/bias": layer.bias}
    return None


def official_variables(model):
    """Maps each official checkpoint name to the variable of ``model`` (a keras_vit model) it loads into.

    A layer with weights that has no official counterpart is a ``ValueError``.
    """
    variables = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        entries = _layer_variables(layer)
        if entries is None:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no counterpart in the official checkpoints; "
                "only models built by keras_vit.vision_transformer can load them."
            )
        variables.update(entries)
    return variables


def model_arrays(model):
    """The weights of a keras_vit model as ``{official name: float32 array}``, ready to save as an official .npz."""
    return {name: keras.ops.convert_to_numpy(v) for name, v in official_variables(model).items()}


def model_geometry(model):
    """``(grid, num_prefix_tokens)`` of a keras_vit model: its token grid (gh, gw) and 1 or 0 class tokens."""
    if hasattr(model, "grid") and hasattr(model, "num_prefix_tokens"):
        return model.grid, model.num_prefix_tokens
    embedding = next(layer for layer in model.layers if isinstance(layer, Patches))
    height, width = embedding.input.shape[1:3]
    prefix = int(any(isinstance(layer, ClassToken) for layer in model.layers))
    return (height // embedding.patch_size[0], width // embedding.patch_size[1]), prefix
