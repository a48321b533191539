"""Download of pretrained files into the cache: an overall deadline, a check of what arrived, a hash check.

The cache folder is ``$KERAS_VIT_CACHE``, else ``keras_vit`` in
``$KERAS_HOME`` (``~/.keras``). A file is cached under its last folder and
file name joined with ``--`` (unquoted) and a digest of the whole URL, so
that two URLs never share a file:
``imagenet21k+imagenet2012--R50+ViT-B_16--3f0c5e9a1b7d2c64.npz``. Files of
the official bucket cached by older versions under the name without the
digest (``imagenet21k+imagenet2012--R50+ViT-B_16.npz``, or URL-quoted
``imagenet21k%2Bimagenet2012--R50%2BViT-B_16.npz``) are still found: in
that bucket one such name is one file. For other URLs an old name may hold
another URL's file, so it is not used.

A download is written to a temporary ``.<name>.<random>.part`` beside its
target and moved into place only when complete (as many bytes as the
server announced) and plausible (an archive's or an HDF5 file's first
bytes for ``.npz``, ``.keras`` and ``.h5`` names; never a web page). A
temporary left by a killed process is deleted by the next download into
the folder once nobody has written to it for ``STALE_AFTER_S``.
"""

import hashlib
import http.client
import os
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from keras_vit.pretrained.registry import BUCKET

DOWNLOAD_TIMEOUT_S = 15.0  # connecting, and each wait for data
DOWNLOAD_DEADLINE_S = 3600.0  # the whole download (ViT-H/14's 2.5 GB at 0.7 MB/s)
STALE_AFTER_S = 600.0  # a live download writes at least every DOWNLOAD_TIMEOUT_S
_PART = ".part"
_CHUNK = 1 << 20
_SIGNATURES = {  # what a file of this name starts with
    ".npz": (b"PK\x03\x04", b"PK\x05\x06"), ".keras": (b"PK\x03\x04",), ".zip": (b"PK\x03\x04", b"PK\x05\x06"),
    ".h5": (b"\x89HDF\r\n\x1a\n",),
}


def cache_dir():
    """The download cache folder: ``$KERAS_VIT_CACHE``, else ``keras_vit`` in ``$KERAS_HOME`` (``~/.keras``)."""
    default = Path(os.environ.get("KERAS_HOME", "~/.keras")) / "keras_vit"
    return Path(os.environ.get("KERAS_VIT_CACHE", default)).expanduser()


def _usable_cache_dir():
    """``cache_dir()``, created; an ``OSError`` naming the variable that set it when it cannot hold files."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no permission to write in {folder}")
    except OSError as error:
        variable = next((v for v in ("KERAS_VIT_CACHE", "KERAS_HOME") if v in os.environ), None)
        setting = f"set by {variable}={os.environ[variable]}" if variable else "the default"
        if folder.is_file():
            reason = "it is a file, not a folder"
        elif isinstance(error, (NotADirectoryError, FileExistsError)):
            reason = "a folder above it is a file"
        else:
            reason = error.strerror or str(error)
        raise type(error)(
            f"The download cache folder {folder} ({setting}) cannot be used: {reason}. Set KERAS_VIT_CACHE to a "
            "folder you can write to (it is created if missing), or unset it to use ~/.keras/keras_vit."
        ) from None
    return folder


def sha256_of(path, chunk=_CHUNK):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_and_file(url, quoted=False):
    """The URL path's last folder and file joined with ``--`` (URL quoting removed unless ``quoted``)."""
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    name = "--".join(parts[-2:]) if len(parts) > 1 else (parts[-1] if parts else "download")
    return name if quoted else urllib.parse.unquote(name)


def file_suffix(name):
    """A file name's suffix, ``.weights.h5`` counted as one: ``"vit.weights.h5"`` -> ``".weights.h5"``."""
    return ".weights.h5" if name.endswith(".weights.h5") else Path(name).suffix


def cached_name(url):
    """The cache file name of ``url``: folder and file joined and a digest of the URL, e.g.
    ``imagenet21k+imagenet2012--ViT-B_16--3f0c5e9a1b7d2c64.npz`` (the suffix kept last)."""
    name = _folder_and_file(url)
    suffix = file_suffix(name)
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f"{name[: len(name) - len(suffix)]}--{digest}{suffix}"


def _older_names(url):
    """Names older versions cached ``url`` under, where they mean that URL alone: the official bucket's."""
    if not url.startswith(BUCKET):
        return []
    return [_folder_and_file(url), _folder_and_file(url, quoted=True)]


def is_cached(path):
    """Whether ``path`` lies in the download cache."""
    try:
        return Path(path).resolve().parent == cache_dir().resolve()
    except OSError:
        return False


def _remove_stale_temporaries(folder):
    """Deletes the temporaries of downloads that were killed (nobody wrote to them for ``STALE_AFTER_S``)."""
    now = time.time()
    for temporary in folder.glob(f".*{_PART}"):
        try:
            if now - temporary.stat().st_mtime > STALE_AFTER_S:
                temporary.unlink()
        except OSError:
            pass  # removed meanwhile by another process


class _Refused(Exception):
    """What arrived is not the file: the message says why."""


def _copy(response, file, deadline_at, deadline):
    """Copies ``response`` to ``file`` until the end or ``deadline_at`` (monotonic); returns the bytes copied."""
    read = getattr(response, "read1", response.read)  # read1: returns what has arrived, so the deadline is checked
    received = 0
    while True:
        if time.monotonic() > deadline_at:
            raise TimeoutError(f"not complete after the {deadline:g} s deadline, {received:,} bytes received")
        block = read(_CHUNK)
        if not block:
            return received
        file.write(block)
        received += len(block)


def _check_arrival(path, name, received, announced, content_type):
    """Refuses a short file (fewer bytes than announced) and a file that does not start as its name says."""
    if announced is not None and received != announced:
        raise ConnectionError(f"the connection closed after {received:,} of the {announced:,} bytes announced")
    with open(path, "rb") as file:
        head = file.read(16)
    expected = _SIGNATURES.get(Path(name).suffix)
    looks_like_page = content_type == "text/html" or head.lstrip()[:1] == b"<"
    if (expected and not head.startswith(expected)) or (not expected and looks_like_page):
        what = "a web page" if looks_like_page else "a file"
        raise _Refused(
            f"the server sent {what} ({content_type}, starting {head[:12]!r}), not the {file_suffix(name) or 'file'} "
            "expected: the address is wrong or needs a login (e.g. a sharing page rather than the direct link)"
        )


def _download(url, target, timeout, deadline):
    """Streams ``url`` to ``target`` through a temporary beside it, within ``deadline`` seconds in all."""
    deadline_at = time.monotonic() + deadline
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_PART, dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            content_type = response.headers.get_content_type()
            received = _copy(response, file, deadline_at, deadline)
        _check_arrival(temporary, target.name, received, int(length) if length else None, content_type)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def fetch(url, sha256=None, timeout=DOWNLOAD_TIMEOUT_S, deadline=DOWNLOAD_DEADLINE_S):
    """Downloads ``url`` into the cache (once) and returns the local path.

    ``timeout``: seconds to connect and to wait for each piece of data;
    ``deadline``: seconds for the whole download (checked whenever data
    arrives, so it ends within ``deadline + timeout``). A URL that cannot be
    reached, a download that is too slow or cut short is a ``ConnectionError``
    saying where to place the file by hand; a web page (or another file
    than the name says) is a ``ValueError``; in both cases nothing is
    cached. With ``sha256`` the file is verified after download (and when
    found in the cache); a mismatch deletes the file and raises ``ValueError``.
    A cache folder that cannot hold files is an ``OSError`` naming the
    variable that chose it.
    """
    folder = _usable_cache_dir()
    target = folder / cached_name(url)
    for candidate in [target] + [folder / name for name in _older_names(url)]:
        if candidate.exists():
            if sha256 is None or sha256_of(candidate) == sha256:
                return candidate
            candidate.unlink()  # a stale or damaged copy: download it again
    _remove_stale_temporaries(folder)
    try:
        _download(url, target, timeout, deadline)
    except _Refused as refusal:
        raise ValueError(f"Downloading {url}: {refusal}. Nothing was cached.") from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError, timeouts, refusals: OSErrors
        raise ConnectionError(
            f"Could not download {url} ({error}); nothing was cached. Retry, or without network access download "
            f"it elsewhere and place it at {target} (the cache folder is set by KERAS_VIT_CACHE), or pass the "
            "local file path as weights=."
        ) from None
    if sha256 is not None and sha256_of(target) != sha256:
        target.unlink()
        raise ValueError(
            f"The file downloaded from {url} does not have the expected sha256 {sha256}; it was deleted. "
            "Retry the download; if it fails again the file on the server has changed."
        )
    return target
