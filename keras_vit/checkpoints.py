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
from keras_vit.resnet import ResNetStage, StdConv2D, stem_stride

_PREFIXES = ("opt/target/", "params/")
# Linen submodule name -> pre-Linen name, inside an encoder block.
_LINEN_TO_PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUP_NORM_KEY = re.compile(r"(^|/)gn(_root|_proj|\d+)/(scale|bias)$")
_UNIT_KEY = re.compile(r"^block(\d+)/unit(\d+)/")
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


def read_npz(path, progress=False):
    """Reads an ``.npz`` archive into ``{name: array}`` without unpickling anything.

    ``progress=True`` shows a progress bar over the arrays (for large files). Raises ``ValueError`` for a missing, truncated or corrupt file and for one
    that holds pickled objects.
    """
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.") from None
    if magic != b"PK\x03\x04":
        kind = "a single .npy array" if magic == b"\x93NUM" else "not a zip archive"
        raise ValueError(f"{path} is not an .npz checkpoint ({kind}; truncated or corrupt?). Download it again.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            bar = keras.utils.Progbar(len(archive.files), unit_name="array") if progress else None
            arrays = {}
            for name in archive.files:
                arrays[name] = archive[name]
                if bar:
                    bar.add(1)
            return arrays
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


def decode_array(array):
    """float32 view of a checkpoint array; bfloat16 stored as raw 16-bit patterns (void or uint16) is widened.

    NumPy has no bfloat16, so JAX bfloat16 arrays saved with ``np.savez`` come
    back as 2-byte void (or uint16) data: the upper half of a float32.
    """
    if array.dtype.itemsize == 2 and array.dtype.kind in "Vu":
        bits = np.ascontiguousarray(array).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return array


def encode_like(array, original):
    """``array`` (float) in the storage type of ``original``: the same dtype, or bfloat16 bit patterns."""
    if original.dtype.itemsize == 2 and original.dtype.kind in "Vu":
        bits = np.asarray(array, np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return rounded.view(original.dtype)
    return np.asarray(array).astype(original.dtype)


def normalize_names(arrays):
    """Maps checkpoint arrays to the canonical (released, pre-Linen) names and float arrays.

    Strips ``opt/target/`` and ``params/`` prefixes, renames Linen block
    submodules to their pre-Linen names, widens bfloat16 bit patterns
    (``decode_array``) and flattens GroupNorm parameters stored as
    (1, 1, 1, C) to (C,). Returns a new dict.
    """
    stripped = {}
    for name, array in arrays.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        array = decode_array(array)
        if _GROUP_NORM_KEY.search(name) and array.ndim == 4:
            array = array.reshape(-1)
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


def _group_norm_variables(prefix, layer):
    return {f"{prefix}/scale": layer.gamma, f"{prefix}/bias": layer.beta}


def _stage_variables(stage):
    """``blockS/unitU/{conv1,conv2,conv3,conv_proj}/kernel`` and ``gn*/{scale,bias}`` of a ResNet stage."""
    variables = {}
    for unit in stage.units:
        prefix = f"{stage.name}/{unit.name}"
        for conv, norm in ((unit.conv1, unit.gn1), (unit.conv2, unit.gn2), (unit.conv3, unit.gn3), (unit.conv_proj, unit.gn_proj)):
            if conv is not None:
                variables[f"{prefix}/{conv.name}/kernel"] = conv.kernel
                variables.update(_group_norm_variables(f"{prefix}/{norm.name}", norm))
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
        elif isinstance(layer, StdConv2D) and layer.name == "conv_root":
            entries = {"conv_root/kernel": layer.kernel}
        elif isinstance(layer, keras.layers.GroupNormalization) and layer.name == "gn_root":
            entries = _group_norm_variables("gn_root", layer)
        elif isinstance(layer, ResNetStage):
            entries = _stage_variables(layer)
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


def model_grid(model):
    """The token grid (gh, gw) of a model built by ``vision_transformer``."""
    embedding = next(layer for layer in model.layers if isinstance(layer, Patches))
    height, width = embedding.input.shape[1:3]
    return (height // embedding.patch_size[0], width // embedding.patch_size[1])


def model_arrays(model):
    """The model's weights as ``{official name: float32 array}``, ready to save as an official .npz."""
    return {name: keras.ops.convert_to_numpy(v) for name, v in official_variables(model).items()}


def adapt_arrays(arrays, model, source_grid=None):
    """Fits checkpoint arrays to a model whose top or resolution differ (a checkpoint filter).

    * a head the model lacks (``include_top=False``) is dropped, and a model
      head the checkpoint lacks (an encoder saved without top) stays as initialised;
    * a head with another number of classes is dropped and the model keeps
      its own zero-initialised head;
    * the pre-logits layer goes with a dropped head unless the model has one;
    * position embeddings for another grid are interpolated to the model's
      grid (``interpolate_posemb``; ``source_grid`` is the checkpoint's grid
      when it is not square).

    Only arrays whose hidden size fits the model are adapted, so a checkpoint
    of another variant still fails ``match_arrays`` with the full list.
    Returns ``(arrays, kept, notes)``: the adapted arrays, the names of model
    weights that keep their initial values, and one line per adaptation.
    """
    variables = official_variables(model)
    arrays = dict(arrays)
    kept, notes = set(), []
    head, model_head = arrays.get("head/kernel"), variables.get("head/kernel")
    if head is None and model_head is not None and "embedding/kernel" in arrays:
        kept |= {"head/kernel", "head/bias"}  # a headless encoder (include_top=False, self-supervised)
        notes.append(f"The checkpoint has no head: the model keeps its zero-initialised {model_head.shape[-1]}-class head.")
    elif head is not None and model_head is None:
        arrays.pop("head/kernel"), arrays.pop("head/bias", None)
        notes.append("Dropped the checkpoint's head: the model has none (include_top=False).")
    elif head is not None and head.shape[0] == model_head.shape[0] and head.shape != tuple(model_head.shape):
        arrays.pop("head/kernel"), arrays.pop("head/bias", None)
        kept |= {"head/kernel", "head/bias"}
        notes.append(
            f"Replaced the checkpoint's {head.shape[-1]}-class head by a zero-initialised "
            f"{model_head.shape[-1]}-class head."
        )
    # The pre-logits layer goes with the head it fed, as in the official fine-tuning code.
    if "pre_logits/kernel" in arrays and "pre_logits/kernel" not in variables and "head/kernel" not in arrays:
        arrays.pop("pre_logits/kernel"), arrays.pop("pre_logits/bias", None)
        notes.append("Dropped the checkpoint's pre_logits layer: the model has no representation layer.")
    name = "Transformer/posembed_input/pos_embedding"
    posemb, model_posemb = arrays.get(name), variables.get(name)
    if posemb is not None and posemb.ndim == 3 and posemb.shape[-1] == model_posemb.shape[-1] and (
        posemb.shape[1] != model_posemb.shape[1]
    ):
        prefix = int("cls" in variables)
        grid = model_grid(model)
        arrays[name] = interpolate_posemb(posemb, grid, num_prefix_tokens=prefix, source_grid=source_grid)
        notes.append(
            f"Interpolated position embeddings from {posemb.shape[1] - prefix} grid tokens to a "
            f"{grid[0]}x{grid[1]} grid."
        )
    return arrays, kept, notes


def load_arrays(model, arrays, adapt=False, source="checkpoint", log=None, source_grid=None):
    """Assigns ``{official name: array}`` to ``model``: strict, or through ``adapt_arrays`` first.

    Nothing is assigned when the arrays do not match. ``log`` receives one
    line per adaptation once loading succeeded. Returns ``model``.
    """
    arrays = normalize_names(arrays)
    kept, notes = set(), []
    if adapt:
        arrays, kept, notes = adapt_arrays(arrays, model, source_grid)
    variables = {k: v for k, v in official_variables(model).items() if k not in kept}
    match_arrays(variables, arrays, source=source)
    for name, variable in variables.items():
        variable.assign(np.asarray(arrays[name], dtype=variable.dtype))
    for note in notes:
        (log or (lambda message: None))(note)
    return model


def load_official_weights(model, path, adapt=False, log=None):
    """Loads an official ``.npz`` checkpoint into a model built by ``vision_transformer``.

    Strict by default: the model must have the checkpoint's architecture and
    resolution; every model weight is assigned and every array used, with
    equal shapes; otherwise a ``CheckpointMismatchError`` lists the missing,
    unexpected and mis-shaped names and nothing is assigned. With
    ``adapt=True`` the head, top and resolution may differ (see
    ``adapt_arrays``); ``log`` receives one line per adaptation. Returns ``model``.
    """
    return load_arrays(model, read_npz(path), adapt=adapt, source=str(path), log=log)


def token_stride(config):
    """Pixels per token (rows, columns) of a ``vision_transformer`` config: patch size x ResNet stride."""
    patch = config["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    stride = stem_stride(config["resnet_layers"]) if config.get("resnet_layers") is not None else 1
    return (patch[0] * stride, patch[1] * stride)


def infer_config(arrays):
    """Infers ``vision_transformer`` keyword arguments from official checkpoint arrays alone.

    Returns hidden_size, num_layers, num_heads, mlp_dim, patch_size, channels,
    classifier, representation_size, classes (None without a head),
    image_size (from a square position-embedding grid; None for a rectangular one) and, for hybrids,
    resnet_layers (units per stage) and resnet_width_factor.
    """
    arrays = normalize_names(arrays)
    try:
        kernel = arrays["embedding/kernel"]
        posemb = arrays["Transformer/posembed_input/pos_embedding"]
        query = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        mlp = arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    except KeyError as error:
        raise ValueError(f"Not an official ViT checkpoint: it has no {error.args[0]!r} array.") from None
    blocks = {m[1] for m in map(_BLOCK_KEY.match, arrays) if m}
    prefix = int("cls" in arrays)
    try:
        grid = square_grid(posemb.shape[1] - prefix)
    except ValueError:
        grid = None  # a rectangular grid: the image size cannot be read off the arrays
    patch = tuple(int(p) for p in kernel.shape[:2])
    hybrid = {}
    if "conv_root/kernel" in arrays:
        units = [m.groups() for m in map(_UNIT_KEY.match, arrays) if m]
        stages = sorted({int(stage) for stage, _ in units})
        if stages != list(range(1, len(stages) + 1)):
            raise ValueError(f"ResNet stages {stages} of the checkpoint are not numbered block1, block2, ...")
        layers = tuple(len({unit for stage, unit in units if int(stage) == s}) for s in stages)
        hybrid = dict(resnet_layers=layers, resnet_width_factor=arrays["conv_root/kernel"].shape[-1] / 64)
    stride = token_stride(dict(patch_size=patch, **hybrid))
    return dict(
        image_size=(grid[0] * stride[0], grid[1] * stride[1]) if grid else None,
        patch_size=patch,
        hidden_size=int(kernel.shape[-1]),
        num_layers=len(blocks),
        num_heads=int(query.shape[1]),
        mlp_dim=int(mlp.shape[1]),
        channels=int((arrays["conv_root/kernel"] if hybrid else kernel).shape[2]),
        classifier="token" if prefix else "gap",
        representation_size=int(arrays["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in arrays else None,
        classes=int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else None,
        **hybrid,
    )


def _linear_resample(array, size, axis):
    """Linear interpolation along ``axis`` to ``size`` samples with aligned corners (float64)."""
    old = array.shape[axis]
    if size == old:
        return array
    positions = np.arange(size) * ((old - 1) / (size - 1)) if size > 1 else np.zeros(1)
    low = np.clip(np.floor(positions).astype(int), 0, old - 1)
    high = np.minimum(low + 1, old - 1)
    frac = (positions - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, low, axis=axis) * (1 - frac) + np.take(array, high, axis=axis) * frac


def square_grid(num_tokens):
    """The (g, g) grid of ``num_tokens`` grid tokens; ``ValueError`` when it is not a square."""
    side = int(round(np.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} position embeddings do not form a square grid; pass the source grid (rows, columns) "
            "explicitly for a rectangular checkpoint."
        )
    return (side, side)


def interpolate_posemb(posemb, target_grid, num_prefix_tokens=1, source_grid=None):
    """Resizes position embeddings (1, prefix + gh*gw, D) to (1, prefix + th*tw, D), the official way.

    The prefix (class-token) rows are kept; the grid is resampled bilinearly
    with aligned corners, which is what the official ``interpolate_posembed``
    does through ``scipy.ndimage.zoom(order=1)``. Computed in float64, returned
    in the input dtype. ``source_grid`` defaults to the square grid; rectangular
    grids are supported both ways.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"Position embeddings must be shaped (1, tokens, hidden), got {posemb.shape}.")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:].astype(np.float64)
    source_grid = tuple(source_grid) if source_grid is not None else square_grid(grid.shape[0])
    if source_grid[0] * source_grid[1] != grid.shape[0]:
        raise ValueError(f"Source grid {source_grid} does not hold the {grid.shape[0]} position embeddings given.")
    grid = grid.reshape(*source_grid, -1)
    grid = _linear_resample(_linear_resample(grid, target_grid[0], 0), target_grid[1], 1)
    grid = grid.reshape(1, target_grid[0] * target_grid[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, grid], axis=1)
