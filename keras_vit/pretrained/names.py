"""Official checkpoint names: canonical spelling, and the strict one-to-one match with a model.

Names are the Flax module path joined with ``/`` (e.g.
``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``). Encoder blocks use
the pre-Linen numbering (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
``LayerNorm_2``, ``MlpBlock_3``); files written by the Linen code use
``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
``MlpBlock_0``. Both are accepted, as are ``opt/target/`` and ``params/``
prefixes and big_vision's layouts: the stacked ``scan`` layout
(``Transformer/encoderblock/...`` with a leading layer axis) and the image tower of a
two-tower (SigLIP, LiT) checkpoint (``img/...``).

The layers of a keras_vit model declare their weights' official names (``keras_vit.official_names``).
"""

import collections
import re

import numpy as np

from keras_vit.errors import CheckpointMismatchError  # noqa: F401  (raised by the matching rules beside it)
from keras_vit.pretrained.npz import decode_array

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
_BIG_VISION_POSEMB = "pos_embedding"  # big_vision keeps the table at the top level, without a class-token row
_SCAN_BLOCK = "Transformer/encoderblock/"  # big_vision's scan layout: every block's arrays stacked on a leading axis
_IMAGE_TOWER = "img/"  # the image tower of a big_vision two-tower (SigLIP, LiT) checkpoint; txt/, t and b are not


def normalize_names(arrays):
    """Maps checkpoint arrays to the canonical (released, pre-Linen, one array per block) names and float arrays.

    In order: strips ``opt/target/`` and ``params/`` prefixes and drops optimizer state (``opt/state/...``);
    keeps only the image tower of a two-tower checkpoint (``img/...``; the text tower ``txt/...`` and the
    temperature and bias ``t``, ``b`` are dropped); widens bfloat16 bit patterns; unstacks big_vision's ``scan``
    layout (``Transformer/encoderblock/X`` shaped (L, ...) -> ``Transformer/encoderblock_{i}/X``); renames Linen
    block submodules to their pre-Linen names and big_vision's top-level ``pos_embedding`` to the 2020 name;
    flattens GroupNorm parameters stored as (1, 1, 1, C) to (C,). Returns a new dict; a scan layout whose arrays
    disagree on the number of layers is a ``ValueError``.
    """
    decoded = {}
    for name, array in _unstack_scan({name: decode_array(array) for name, array in model_arrays(arrays).items()}).items():
        if name == _BIG_VISION_POSEMB:
            name = POSEMB
        if _GROUP_NORM_KEY.search(name) and array.ndim == 4:
            array = array.reshape(-1)
        decoded[name] = array
    linen_blocks = {
        m[1] for m in map(BLOCK_KEY.match, decoded) if m and m[2] in ("MultiHeadDotProductAttention_0", "MlpBlock_0")
    }
    normalized = {}
    for name, array in decoded.items():
        match = BLOCK_KEY.match(name)
        if match and match[1] in linen_blocks:
            name = f"{match[1]}/{_LINEN_TO_PRE_LINEN.get(match[2], match[2])}/{match[3]}"
        normalized[name] = array
    return normalized


def model_arrays(arrays):
    """The arrays of a checkpoint that a model reads, as stored (not decoded), their ``opt/target/`` and ``params/``
    prefixes stripped: optimizer state (``opt/state/...``) and, in a two-tower checkpoint, everything but the image
    tower (``img/...``, prefix stripped too) are left out."""
    stripped = {}
    for name, array in arrays.items():
        if name.startswith(_OPTIMIZER_STATE):
            continue
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        stripped[name] = array
    if any(name.startswith(_IMAGE_TOWER) for name in stripped):
        stripped = {name.removeprefix(_IMAGE_TOWER): array for name, array in stripped.items()
                    if name.startswith(_IMAGE_TOWER)}
    return stripped


def _unstack_scan(arrays):
    """big_vision's stacked blocks ``Transformer/encoderblock/X`` (L, ...) as ``Transformer/encoderblock_{i}/X``."""
    stacked = {name: array for name, array in arrays.items() if name.startswith(_SCAN_BLOCK)}
    if not stacked:
        return arrays
    depths = {int(array.shape[0]) if array.ndim else 0 for array in stacked.values()}
    if len(depths) != 1 or 0 in depths:
        raise ValueError(
            f"The stacked encoder blocks ({_SCAN_BLOCK}...) of this checkpoint disagree on the number of layers "
            f"(leading axes {sorted(depths)}): the file is damaged or not a big_vision checkpoint."
        )
    unstacked = {name: array for name, array in arrays.items() if name not in stacked}
    for name, array in stacked.items():
        for i in range(array.shape[0]):
            block_name = f"Transformer/encoderblock_{i}/{name[len(_SCAN_BLOCK):]}"
            if block_name in unstacked:
                raise ValueError(f"The checkpoint holds {block_name} both stacked ({name}) and on its own.")
            unstacked[block_name] = array[i]
    return unstacked


def official_layout(arrays):
    """Canonical arrays as the 2020 official files hold them: ``normalize_names`` run backwards, which for the
    official names only reshapes a hybrid's GroupNorm scales and biases (C,) -> (1, 1, 1, C). Returns a new dict."""
    return {name: array.reshape(1, 1, 1, -1) if _GROUP_NORM_KEY.search(name) and array.ndim == 1 else array
            for name, array in arrays.items()}


def big_vision_layout(arrays, scan=False):
    """Canonical arrays in big_vision's names: ``normalize_names``' big_vision rules run backwards.

    Linen block submodules (``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``), the position
    embeddings at the top level (``pos_embedding``, which holds no class-token row in big_vision); with
    ``scan=True`` the blocks stacked on a leading layer axis (``Transformer/encoderblock/...`` (L, ...)), as
    big_vision's ``scan`` models hold them. Returns a new dict.
    """
    renamed = {}
    for name, array in arrays.items():
        match = BLOCK_KEY.match(name)
        if match:
            name = f"{match[1]}/{_PRE_LINEN_TO_LINEN.get(match[2], match[2])}/{match[3]}"
        renamed[_BIG_VISION_POSEMB if name == POSEMB else name] = array
    return _stack_scan(renamed) if scan else renamed


_PRE_LINEN_TO_LINEN = {pre_linen: linen for linen, pre_linen in _LINEN_TO_PRE_LINEN.items()}


def _stack_scan(arrays):
    """``Transformer/encoderblock_{i}/X`` as one ``Transformer/encoderblock/X`` (L, ...), ``_unstack_scan``'s
    inverse."""
    blocks = collections.defaultdict(dict)
    stacked = {}
    for name, array in arrays.items():
        match = BLOCK_KEY.match(name)
        if match:
            blocks[f"{match[2]}/{match[3]}"][int(match[1].rsplit("_", 1)[1])] = array
        else:
            stacked[name] = array
    for name, layers in blocks.items():
        stacked[f"{_SCAN_BLOCK}{name}"] = np.stack([layers[i] for i in sorted(layers)])
    return stacked


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
