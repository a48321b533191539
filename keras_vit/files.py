"""Files written whole or not at all, and their digests: the one atomic-write rule and the one sha256 helper.

``atomic_file(target)`` yields a temporary path beside ``target``; the block writes it, and it replaces ``target``
in one rename when the block ends without an error, or is deleted (``target`` untouched) when it raises.
"""

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def umask():
    """The process's file-mode creation mask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(target, suffix=None, temporary=None):
    """Yields a temporary path beside ``target`` for the block to write; renames it over ``target`` on success,
    deletes it on an error (``target`` untouched).

    By default a new empty file ``.<target name>.<random><suffix>`` (``suffix``: ``target``'s last suffix, so that
    writers that pick a format by it pick the right one) with a normal file's permissions; ``temporary``: a fixed
    path instead (for writers that clear by name what a killed write left).
    """
    target = Path(target)
    if temporary is None:
        suffix = target.suffix if suffix is None else suffix
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(handle)
        os.chmod(name, 0o666 & ~umask())  # mkstemp makes it private
        temporary = name
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def sha256_of(path, chunk=_CHUNK):
    """The SHA-256 of the file at ``path`` (hex), read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
