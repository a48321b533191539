"""Reading official ``.npz`` checkpoints and the bfloat16 codec of their arrays.

The released checkpoints are uncompressed ``np.savez`` archives, one member
per parameter. Arrays are never unpickled (``allow_pickle=False``), and each
member's ``.npy`` header (shape, dtype) is checked before anything is
allocated (``array_headers``): a small file that would decompress to a huge
array is refused. NumPy has no bfloat16: JAX bfloat16 arrays saved with
``np.savez`` come back as 2-byte void (or uint16) data, the upper half of a
float32 (``decode_array``, ``encode_like``).
"""

import collections
import io
import os
import struct
import zipfile
import zlib

import keras
import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_RANK = 4  # ViT arrays: vectors, matrices, attention kernels (D, H, K), convolution kernels (h, w, C, D)
MAX_EXPANSION = 16  # array bytes per byte of file; trained float weights barely compress (about 1.1x)
READ_ANYWAY_BYTES = 256 << 20  # arrays this large in all are read whatever the file size

ArrayHeader = collections.namedtuple("ArrayHeader", "shape dtype nbytes")
ArrayHeader.__doc__ = "What an ``.npy`` member declares: its shape, dtype and data size in bytes."


def _size(nbytes):
    """``1.2 GB``-style size for messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _zip_kind(archive):
    """What a zip archive that is not an .npz holds, with what to do, or None when it looks like an .npz."""
    names = archive.namelist()
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return (
            "a Keras .keras model file, not an official .npz checkpoint: load it with keras.models.load_model, "
            "or pass it with its .keras name as weights= / to keras_vit.from_official_checkpoint"
        )
    if names and not all(n.endswith(".npy") for n in names):
        return f"a zip archive of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}, not an .npz checkpoint"
    return None


def _check_magic(path):
    """Refuses, saying what the file is, anything that does not start as a zip archive does."""
    try:
        with open(path, "rb") as file:
            magic = file.read(len(_HDF5_MAGIC))
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.") from None
    if magic.startswith(_ZIP_MAGIC):
        return
    if magic == _HDF5_MAGIC:
        raise ValueError(
            f"{path} is an HDF5 file (a legacy Keras .h5 model or weights file), not an official .npz checkpoint. "
            "Load a whole model with keras.models.load_model and save it as .keras (model.save('model.keras')), "
            "or load the weights into the model that saved them (model.load_weights); then pass the .keras file."
        )
    kind = "a single .npy array" if magic.startswith(b"\x93NUM") else "not a zip archive"
    raise ValueError(f"{path} is not an .npz checkpoint ({kind}; truncated or corrupt?). Download it again.")


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature, ..., name and extra lengths
_NPY_HEADER_MAX = 16 << 10  # NumPy writes (and reads by default) .npy headers of at most 10,000 bytes
_Member = collections.namedtuple("_Member", "info header prefix offset fortran_order")
# prefix: the .npy magic and header (bytes); offset: where a stored member's data starts in the file (else None)


def _member(path, file, archive, info):
    """The ``_Member`` of one ``.npy`` member, its header checked against the bytes the archive holds for it.

    A stored member's header is read straight from the file (one small read);
    a compressed one's through ``zipfile``.
    """
    name = info.filename[: -len(".npy")]
    offset = None
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            file.seek(info.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
            if signature != _ZIP_MAGIC:
                raise zipfile.BadZipFile(f"no local header for {info.filename}")
            offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            file.seek(offset)
            stream = io.BytesIO(file.read(min(info.file_size, _NPY_HEADER_MAX)))
        else:
            stream = archive.open(info)
        with stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
            length = stream.tell()
            prefix = stream.getvalue()[:length] if offset is not None else None
    except (ValueError, SyntaxError, struct.error) as error:
        raise ValueError(f"{path}: array {name!r} is corrupt ({error}). Download the file again.") from None
    if dtype.hasobject:
        raise ValueError(
            f"{path}: array {name!r} holds pickled Python objects; keras_vit never unpickles checkpoint "
            "data (it could run arbitrary code). Re-save the arrays with np.savez as plain numeric arrays."
        )
    if dtype.fields is not None or len(shape) > MAX_RANK:
        raise ValueError(
            f"{path}: array {name!r} is shaped {shape} with dtype {dtype}; a ViT checkpoint holds plain numeric arrays "
            f"of at most {MAX_RANK} dimensions. This is not a checkpoint array: remove it from the file."
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    stored = info.file_size - length
    if nbytes != stored:
        raise ValueError(
            f"{path}: array {name!r} declares shape {shape} {dtype} ({_size(nbytes)}) but the archive holds "
            f"{_size(max(stored, 0))} of it (truncated or corrupt). Download the file again."
        )
    header = ArrayHeader(tuple(shape), dtype, nbytes)
    return name, _Member(info, header, prefix, None if offset is None else offset + length, fortran_order)


def _check_expansion(path, headers):
    """Refuses arrays that would take far more memory than the file's size (a decompression bomb)."""
    total = sum(header.nbytes for header in headers.values())
    file_size = os.path.getsize(path)
    if total > max(READ_ANYWAY_BYTES, MAX_EXPANSION * file_size):
        name, largest = max(headers.items(), key=lambda item: item[1].nbytes)
        raise ValueError(
            f"{path} is a {_size(file_size)} file whose arrays would take {_size(total)} (e.g. {name!r}: "
            f"{largest.shape} {largest.dtype}, {_size(largest.nbytes)}); no trained checkpoint compresses "
            f"{total / file_size:.0f} times, so it was not read (a corrupt or malicious file). "
            "If you trust it, re-save its arrays uncompressed with np.savez."
        )


def _read_member(path, file, archive, name, member):
    """The array of one member, read straight into its buffer (stored) or through ``zipfile`` (compressed);
    CRC-checked either way."""
    buffer = np.empty(member.header.nbytes, np.uint8)
    if member.offset is not None:
        file.seek(member.offset)
        received = file.readinto(buffer)
        intact = zlib.crc32(buffer, zlib.crc32(member.prefix)) == member.info.CRC
    else:
        with archive.open(member.info) as stream:  # zipfile checks the CRC at the end
            stream.seek(member.info.file_size - member.header.nbytes)
            received = stream.readinto(buffer)
        intact = True
    if received != len(buffer) or not intact:
        raise ValueError(f"{path}: array {name!r} is corrupt (truncated, or its CRC does not match). Download the file again.")
    order = "F" if member.fortran_order else "C"
    return buffer.view(member.header.dtype).reshape(member.header.shape, order=order)


def _open_members(path, file, archive):
    """``{name: _Member}`` of an open archive: every header read and checked, nothing allocated."""
    kind = _zip_kind(archive)
    if kind:
        raise ValueError(f"{path} is {kind}.")
    members = dict(_member(path, file, archive, info) for info in archive.infolist())
    _check_expansion(path, {name: member.header for name, member in members.items()})
    return members


def _unreadable(path, error):
    return ValueError(f"{path} is not a readable .npz checkpoint (truncated or corrupt: {error}). Download it again.")


def array_headers(path):
    """``{name: ArrayHeader}`` of an ``.npz`` archive, read from the ``.npy`` headers only (nothing allocated).

    Refuses with a ``ValueError`` of one line naming the file (and the
    array) what cannot be a checkpoint: not a zip of ``.npy`` arrays (an HDF5
    ``.h5``, a ``.keras`` file, a web page), a truncated or corrupt member,
    pickled objects, arrays of more than ``MAX_RANK`` dimensions, and arrays
    of more than ``READ_ANYWAY_BYTES`` in all that take over
    ``MAX_EXPANSION`` times the file's size (a decompression bomb). A
    missing file is a ``FileNotFoundError``.
    """
    _check_magic(path)
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            return {name: member.header for name, member in _open_members(path, file, archive).items()}
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise _unreadable(path, error) from None


def read_npz(path, progress=False, check=None):
    """Reads an ``.npz`` archive into ``{name: array}`` without unpickling anything.

    Every header is checked first (``array_headers``), and then
    ``check({name: ArrayHeader})`` when given (it raises to refuse), so
    nothing large is allocated for a file that cannot be a checkpoint.
    Arrays are read straight into their buffers and CRC-checked (NumPy's
    ``np.load`` copies each array once more). ``progress=True`` shows a
    progress bar over the arrays. A missing file is a ``FileNotFoundError``;
    a file that cannot be a checkpoint is a ``ValueError`` that names the
    file (and the array) and says what to do.
    """
    _check_magic(path)
    try:
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            members = _open_members(path, file, archive)
            if check is not None:
                check({name: member.header for name, member in members.items()})
            bar = keras.utils.Progbar(len(members), unit_name="array") if progress else None
            arrays = {}
            for name, member in members.items():
                arrays[name] = _read_member(path, file, archive, name, member)
                if bar:
                    bar.add(1)
            return arrays
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise _unreadable(path, error) from None


def stand_ins(shapes):
    """Zero-stride float32 stand-ins of arrays with these shapes (no memory), for code that reads only shapes."""
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


def decode_array(array):
    """float32 view of a checkpoint array; bfloat16 stored as raw 16-bit patterns (void or uint16) is widened."""
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
