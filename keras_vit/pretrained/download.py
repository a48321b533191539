"""Download of pretrained files into the cache, with a per-request timeout and a hash check.

The cache folder is ``$KERAS_VIT_CACHE``, else ``keras_vit`` in
``$KERAS_HOME`` (``~/.keras``). A file is cached under its last folder and
file name joined with ``--``, unquoted, so that a person placing a file by
hand can type it: ``imagenet21k+imagenet2012--R50+ViT-B_16.npz``. Files
cached by older versions under the URL-quoted name
(``imagenet21k%2Bimagenet2012--R50%2BViT-B_16.npz``) are still found.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 15.0


def cache_dir():
    """The download cache folder: ``$KERAS_VIT_CACHE``, else ``keras_vit`` in ``$KERAS_HOME`` (``~/.keras``)."""
    default = Path(os.environ.get("KERAS_HOME", "~/.keras")) / "keras_vit"
    return Path(os.environ.get("KERAS_VIT_CACHE", default)).expanduser()


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_name(url, quoted=False):
    """The cache file name of a URL: its folder and file joined, e.g. ``imagenet21k+imagenet2012--ViT-B_16.npz``.

    ``quoted=True`` gives the name older versions used (URL quoting kept).
    """
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    name = "--".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return name if quoted else urllib.parse.unquote(name)


def is_cached(path):
    """Whether ``path`` lies in the download cache."""
    try:
        return Path(path).resolve().parent == cache_dir().resolve()
    except OSError:
        return False


def _download(url, target, timeout):
    """Streams ``url`` to ``target`` through a temporary file beside it; the socket times out after ``timeout`` s."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, file, 1 << 20)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def fetch(url, sha256=None, timeout=DOWNLOAD_TIMEOUT_S):
    """Downloads ``url`` into the cache (once) and returns the local path.

    With ``sha256`` the file is verified after download (and when found in
    the cache); a mismatch deletes the file and raises ``ValueError``. A URL
    that cannot be reached raises ``ConnectionError`` within about
    ``timeout`` seconds (per request), saying where to place the file by hand.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / cached_name(url)
    for candidate in (target, folder / cached_name(url, quoted=True)):
        if candidate.exists():
            if sha256 is None or sha256_of(candidate) == sha256:
                return candidate
            candidate.unlink()  # a stale or damaged copy: download it again
    try:
        _download(url, target, timeout)
    except (OSError, ValueError) as error:  # URLError, timeouts and refused connections are OSErrors
        raise ConnectionError(
            f"Could not download {url} ({error}). Without network access, download it elsewhere and place it at "
            f"{target} (the cache folder is set by KERAS_VIT_CACHE), or pass the local file path as weights=."
        ) from None
    if sha256 is not None and sha256_of(target) != sha256:
        target.unlink()
        raise ValueError(
            f"The file downloaded from {url} does not have the expected sha256 {sha256}; it was deleted. "
            "Retry the download; if it fails again the file on the server has changed."
        )
    return target
