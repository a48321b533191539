"""Reading ``.safetensors`` files (the Hugging Face Hub's weights format), their headers checked first.

A safetensors file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw arrays back to back. ``tensor_headers``
reads and checks the header against the file's size before anything is allocated: the header fits in the file,
every array is a float array of at most ``MAX_RANK`` dimensions whose byte range matches its shape, and the
ranges tile the data section exactly (a truncated file, or a header that lies, is refused unread). Stored arrays
are never larger than the file, so no decompression bomb is possible; a size check against a model is the
caller's (``check=``), as for ``.npz``. Arrays are read with the ``safetensors`` library's NumPy API;
bfloat16, which NumPy lacks, is read as its 16-bit patterns and widened by ``npz.decode_array``.

PyTorch pickles (``pytorch_model.bin``, ``.pth``) are refused unread (``refuse_pickle``): unpickling runs code.
"""

import json
import math
import os
import struct

import numpy as np
from safetensors import SafetensorError, safe_open

from keras_vit.pretrained.npz import MAX_RANK, ArrayHeader, decode_array

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 16 << 20  # a ViT-G header takes ~80 kB; the format's own limit is 100 MB
_LENGTH = struct.Struct("<Q")
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_METADATA = "__metadata__"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refusal(path, what):
    return ValueError(f"{path} is not a readable safetensors file: {what}. Download it again.")


def refuse_pickle(path):
    """Raises ``ValueError`` (one line) for a PyTorch pickle checkpoint, by its name or its first bytes.

    keras_vit never unpickles (it runs arbitrary code); the Hub holds every timm model as ``model.safetensors``.
    """
    path = os.fspath(path)
    pickled = path.endswith(PICKLE_SUFFIXES)
    if not pickled and os.path.isfile(path):
        with open(path, "rb") as file:
            pickled = file.read(4).startswith(_PICKLE_MAGIC)
    if pickled:
        raise ValueError(
            f"{path} is a PyTorch pickle checkpoint, which keras_vit never loads (unpickling runs arbitrary code): "
            "use the repository's model.safetensors instead (every timm model on the Hugging Face Hub has one)."
        )


def _entry(path, name, entry, data_size):
    """The ``ArrayHeader`` and byte range of one header entry, checked."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _refusal(path, f"its header entry {name!r} is not an array description")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise ValueError(
            f"{path}: array {name!r} is {dtype}; a ViT checkpoint holds float arrays ({', '.join(_DTYPES)}). "
            "This is not a checkpoint array: remove it from the file."
        )
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)) or len(shape) > MAX_RANK:
        raise ValueError(
            f"{path}: array {name!r} is shaped {shape}; a ViT checkpoint holds arrays of at most {MAX_RANK} "
            "dimensions. This is not a checkpoint array: remove it from the file."
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _refusal(path, f"array {name!r} has no valid data_offsets ({offsets!r})")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise _refusal(
            path, f"array {name!r} declares shape {shape} {dtype} ({nbytes:,} bytes) at bytes {begin:,}..{end:,} "
            f"of a {data_size:,}-byte data section (truncated or corrupt)"
        )
    return ArrayHeader(tuple(shape), _DTYPES[dtype], nbytes), (begin, end)


def _header(path):
    """``({name: ArrayHeader}, {name: (begin, end)}, data_start)`` of a safetensors file, every entry checked."""
    refuse_pickle(path)
    try:
        file_size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.") from None
    with open(path, "rb") as file:
        prefix = file.read(_LENGTH.size)
        if len(prefix) < _LENGTH.size:
            raise _refusal(path, f"it has {file_size} bytes, fewer than a header length")
        (length,) = _LENGTH.unpack(prefix)
        if length > min(MAX_HEADER_BYTES, file_size - _LENGTH.size):
            raise _refusal(path, f"it declares a {length:,}-byte header in a {file_size:,}-byte file")
        text = file.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refusal(path, f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _refusal(path, "its header is not a JSON object")
    header.pop(_METADATA, None)
    data_start = _LENGTH.size + length
    data_size = file_size - data_start
    headers, ranges = {}, {}
    for name, entry in header.items():
        headers[name], ranges[name] = _entry(path, name, entry, data_size)
    covered = 0
    for begin, end in sorted(ranges.values()):
        if begin != covered:
            raise _refusal(path, f"its arrays overlap or leave a gap at byte {min(begin, covered):,}")
        covered = end
    if covered != data_size:
        raise _refusal(path, f"its arrays take {covered:,} bytes but the file holds {data_size:,} after the header")
    return headers, ranges, data_start


def tensor_headers(path):
    """``{name: ArrayHeader}`` of a safetensors file, from its header alone (nothing allocated), checked.

    Refuses (``ValueError``, one line naming the file and the array) a PyTorch pickle, a file shorter than its
    header says, a header that is not JSON, an array that is not float or has more than ``MAX_RANK``
    dimensions, byte ranges that do not match their shapes, overlap, leave gaps or run past the end of the file.
    A missing file is a ``FileNotFoundError``.
    """
    return _header(path)[0]


def read_safetensors(path, check=None):
    """Reads a safetensors file into ``{name: array}`` (float arrays; bfloat16 widened to float32).

    The header is checked first (``tensor_headers``), then ``check({name: ArrayHeader})`` when given (it
    raises to refuse, e.g. a file far larger than the model), so nothing is allocated for a file that cannot
    be a checkpoint. Errors as ``tensor_headers``.
    """
    headers, ranges, data_start = _header(path)
    if check is not None:
        check(headers)
    arrays = {}
    try:
        with safe_open(os.fspath(path), framework="numpy") as tensors:
            for name, header in headers.items():
                if header.dtype == _DTYPES["BF16"]:  # NumPy has no bfloat16: the raw patterns, widened
                    begin = data_start + ranges[name][0]
                    raw = np.fromfile(path, header.dtype, math.prod(header.shape), offset=begin)
                    arrays[name] = decode_array(raw.reshape(header.shape))
                else:
                    arrays[name] = tensors.get_tensor(name)
    except (SafetensorError, OSError) as error:
        raise _refusal(path, str(error)) from None
    return arrays
