"""Reading official ``.npz`` checkpoints and the bfloat16 codec of their arrays.

The released checkpoints are uncompressed ``np.savez`` archives, one member
per parameter. Arrays are never unpickled (``allow_pickle=False``). NumPy has
no bfloat16: JAX bfloat16 arrays saved with ``np.savez`` come back as 2-byte
void (or uint16) data, the upper half of a float32 (``decode_array``,
``encode_like``).
"""

import zipfile

import keras
import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"


def _zip_kind(path):
    """What a zip archive that is not an .npz holds, with what to do, or None when it looks like an .npz."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return (
            "a Keras .keras model file, not an official .npz checkpoint: load it with keras.models.load_model, "
            "or pass it with its .keras name as weights= / to keras_vit.from_official_checkpoint"
        )
    if names and not all(n.endswith(".npy") for n in names):
        return f"a zip archive of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}, not an .npz checkpoint"
    return None


def read_npz(path, progress=False):
    """Reads an ``.npz`` archive into ``{name: array}`` without unpickling anything.

    ``progress=True`` shows a progress bar over the arrays. A missing file is
    a ``FileNotFoundError``; a truncated or corrupt file, a zip that is not an
    ``.npz`` (e.g. a renamed ``.keras`` file) and pickled objects are a
    ``ValueError`` that names the file (and the array) and says what to do.
    """
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.") from None
    if magic != _ZIP_MAGIC:
        kind = "a single .npy array" if magic == b"\x93NUM" else "not a zip archive"
        raise ValueError(f"{path} is not an .npz checkpoint ({kind}; truncated or corrupt?). Download it again.")
    try:
        kind = _zip_kind(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(
            f"{path} is not a readable .npz checkpoint (truncated or corrupt: {error}). Download it again."
        ) from None
    if kind:
        raise ValueError(f"{path} is {kind}.")
    with np.load(path, allow_pickle=False) as archive:
        bar = keras.utils.Progbar(len(archive.files), unit_name="array") if progress else None
        arrays = {}
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise ValueError(
                        f"{path}: array {name!r} holds pickled Python objects; keras_vit never unpickles checkpoint "
                        "data (it could run arbitrary code). Re-save the arrays with np.savez as plain numeric arrays."
                    ) from None
                raise ValueError(f"{path}: array {name!r} is corrupt ({error}). Download the file again.") from None
            except (zipfile.BadZipFile, EOFError, OSError, KeyError) as error:
                raise ValueError(
                    f"{path}: array {name!r} is unreadable (truncated or corrupt: {error}). Download the file again."
                ) from None
            if bar:
                bar.add(1)
        return arrays


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
