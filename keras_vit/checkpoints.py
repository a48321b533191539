"""Official JAX/Flax ``.npz`` checkpoints: reading, name mapping, strict loading.

The released checkpoints of google-research/vision_transformer are
uncompressed ``np.savez`` archives with one member per parameter, named by the
Flax module path joined with ``/`` (e.g.
``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``). Encoder blocks use
the pre-Linen numbering (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
``LayerNorm_2``, ``MlpBlock_3``); files written by the Linen code use
``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
``MlpBlock_0``. Both are accepted, as are ``opt/target/`` and ``params/``
prefixes. Arrays are never unpickled (``allow_pickle=False``).
"""

import re
import zipfile

import keras
import numpy as np

from keras_vit.layers import AddPositionEmbs, ClassToken, MultiHeadSelfAttention, Patches, TransformerBlock

_PREFIXES = ("opt/target/", "params/")
# Linen submodule name -> pre-Linen name, inside an encoder block.
_LINEN_TO_PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_KEY = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)/(.*)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not match the model's weights one to one."""

    def __init__(self, source, missing=(), unexpected=(), mis_shaped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mis_shaped = sorted(mis_shaped)
        lines = [f"Checkpoint {source} does not match the model."]
        if self.missing:
            lines.append(f"Missing from the checkpoint ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"Not used by the model ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mis_shaped:
            lines.append(
                f"Shape mismatch ({len(self.mis_shaped)}), name: checkpoint vs model: "
                + ", ".join(f"{name}: {ckpt} vs {model}" for name, ckpt, model in self.mis_shaped)
            )
        lines.append(
            "Build the model with the checkpoint's architecture and resolution "
            "(keras_vit.from_official_checkpoint infers it from the file)."
        )
        super().__init__("\n".join(lines))


def read_npz(path):
    """Reads an ``.npz`` archive into ``{name: array}`` without unpickling anything.

    Raises ``ValueError`` for a missing, truncated or corrupt file and for one
    that holds pickled objects.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError(f"{path} is a single .npy array, not an .npz checkpoint archive.")
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.") from None
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(
                f"{path} holds pickled Python objects; keras_vit never unpickles checkpoint data "
                "(it could run arbitrary code). Re-save the arrays with np.savez as plain numeric arrays."
            ) from None
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as error:
        raise ValueError(
            f"{path} is not a readable .npz checkpoint (truncated or corrupt: {error}). Download it again."
        ) from None


def normalize_names(arrays):
    """Maps checkpoint arrays to the canonical (released, pre-Linen) names.

    Strips ``opt/target/`` and ``params/`` prefixes and renames Linen block
    submodules to their pre-Linen names. Returns a new dict.
    """
    stripped = {}
    for name, array in arrays.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        stripped[name] = array
    linen_blocks = {
        m[1]
        for m in map(_BLOCK_KEY.match, stripped)
        if m and m[2] in ("MultiHeadDotProductAttention_0", "MlpBlock_0")
    }
    normalized = {}
    for name, array in stripped.items():
        match = _BLOCK_KEY.match(name)
        if match and match[1] in linen_blocks:
            name = f"{match[1]}/{_LINEN_TO_PRE_LINEN.get(match[2], match[2])}/{match[3]}"
        normalized[name] = array
    return normalized


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
    variables.update(_attention_variables(attention))
    return variables


def _attention_variables(attention: MultiHeadSelfAttention):
    variables = {}
    for part in ("query", "key", "value", "out"):
        variables[f"MultiHeadDotProductAttention_1/{part}/kernel"] = getattr(attention, f"{part}_kernel")
        variables[f"MultiHeadDotProductAttention_1/{part}/bias"] = getattr(attention, f"{part}_bias")
    return variables


def official_variables(model):
    """Maps each official checkpoint name to the model variable it loads into.

    Works on models built by ``keras_vit.vision_transformer`` (layer names
    follow the official module tree). A layer with weights that has no
    official counterpart is a ``ValueError``.
    """
    variables = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        if isinstance(layer, Patches):
            entries = {"embedding/kernel": layer.kernel, "embedding/bias": layer.bias}
        elif isinstance(layer, ClassToken):
            entries = {"cls": layer.cls}
        elif isinstance(layer, AddPositionEmbs):
            entries = {"Transformer/posembed_input/pos_embedding": layer.pos_embedding}
        elif isinstance(layer, TransformerBlock):
            entries = {f"Transformer/{layer.name}/{k}": v for k, v in _block_variables(layer).items()}
        elif isinstance(layer, keras.layers.LayerNormalization) and layer.name == "encoder_norm":
            entries = {"Transformer/encoder_norm/scale": layer.gamma, "Transformer/encoder_norm/bias": layer.beta}
        elif isinstance(layer, keras.layers.Dense) and layer.name in ("pre_logits", "head"):
            entries = {f"{layer.name}/kernel": layer.kernel, f"{layer.name}/bias": layer.bias}
        else:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no counterpart in the official checkpoints; "
                "only models built by keras_vit.vision_transformer can load them."
            )
        variables.update(entries)
    return variables


def match_arrays(variables, arrays, source="checkpoint"):
    """Checks that ``arrays`` and ``variables`` (both keyed by official name) match one to one.

    Raises ``CheckpointMismatchError`` listing missing, unexpected and
    mis-shaped names; returns nothing when they match.
    """
    missing = set(variables) - set(arrays)
    unexpected = set(arrays) - set(variables)
    mis_shaped = [
        (name, tuple(arrays[name].shape), tuple(variables[name].shape))
        for name in set(variables) & set(arrays)
        if tuple(arrays[name].shape) != tuple(variables[name].shape)
    ]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(source, missing, unexpected, mis_shaped)


def load_official_weights(model, path):
    """Loads an official ``.npz`` checkpoint into a model of the same architecture and resolution.

    Strict: every model weight must be assigned and every array used, with
    equal shapes; otherwise a ``CheckpointMismatchError`` lists the missing,
    unexpected and mis-shaped names and nothing is assigned. Returns ``model``.
    """
    arrays = normalize_names(read_npz(path))
    variables = official_variables(model)
    match_arrays(variables, arrays, source=str(path))
    for name, variable in variables.items():
        variable.assign(np.asarray(arrays[name], dtype=variable.dtype))
    return model
