"""Download of pretrained files into the cache: an overall deadline, a check of what arrived, a hash check.

The cache folder is ``$KERAS_VIT_CACHE``, else ``keras_vit`` in
``$KERAS_HOME`` (``~/.keras``). A file is cached under its last folder and
file name joined with ``--`` (unquoted) and a digest of the whole URL, so
that two URLs never share a file:
``imagenet21k+imagenet2012--R50+ViT-B_16--3f0c5e9a1b7d2c64.npz``. The URL
only ever fills a plain file name inside the cache folder: characters other
than ASCII letters, digits and ``. _ + = -`` (separators of any platform,
``%``, NUL, whatever an encoding decodes to) become ``_``, leading dots are
dropped (no ``..``, no hidden names), the name is at most ``MAX_NAME``
characters, and the target's resolved folder is checked to be the cache
folder before a byte is written. Files of the official bucket cached by
older versions under the name without the digest
(``imagenet21k+imagenet2012--R50+ViT-B_16.npz``, or URL-quoted
``imagenet21k%2Bimagenet2012--R50%2BViT-B_16.npz``) are still found: in
that bucket one such name is one file. For other URLs an old name may hold
another URL's file, so it is not used. A symbolic link at a cache name is
never read: it is replaced by the download.

``file://`` URLs name a local file, which is read in place (not copied into
the cache). Redirects are followed (at most urllib's 10) within the same
host, or to another host over https (as file hosts send downloads to their
storage); a redirect to another host over plain http, or from https to
http, is refused (``UnsafeRedirectError``). The file is cached under the
name of the URL given, never of where a redirect went.

A download is written to a temporary ``.<name>.<random>.part`` beside its
target and moved into place only when complete (as many bytes as the
server announced) and plausible (an archive's or an HDF5 file's first
bytes for ``.npz``, ``.keras`` and ``.h5`` names; never a web page). A
temporary left by a killed process is deleted by the next download into
the folder once nobody has written to it for ``STALE_AFTER_S``.
"""

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from keras_vit.files import atomic_file, sha256_of  # noqa: F401  (sha256_of: part of this module's API)
from keras_vit.pretrained.registry import BUCKET

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 15.0  # connecting, and each wait for data
DOWNLOAD_DEADLINE_S = 3600.0  # the whole download (ViT-H/14's 2.5 GB at 0.7 MB/s)
STALE_AFTER_S = 600.0  # a live download writes at least every DOWNLOAD_TIMEOUT_S
_PART = ".part"
MAX_NAME = 200  # characters of a cache name (file systems allow 255 bytes); the official files' names have up to 131
_MAX_SUFFIX = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")  # anything else, once unquoted, becomes "_" in a cache name
_OLD_NAME = re.compile(r"[A-Za-z0-9_+=%-][A-Za-z0-9._+=%-]*")  # an older version's name: one plain file name
SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20
_SIGNATURES = {  # what a file of this name starts with
    ".npz": (b"PK\x03\x04", b"PK\x05\x06"), ".keras": (b"PK\x03\x04",), ".zip": (b"PK\x03\x04", b"PK\x05\x06"),
    ".h5": (b"\x89HDF\r\n\x1a\n",),
}
_SHA256 = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')  # a response header holding a file's SHA-256 (the Hub's ETags)


def _safetensors_head(head, size):
    """Whether ``head`` (the first bytes of a file of ``size`` bytes) starts a safetensors file: a little-endian
    header length that fits the file, then the JSON header's ``{``."""
    return len(head) >= 9 and 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def _looks_like(name, head, size):
    """Whether a file called ``name`` of ``size`` bytes starting with ``head`` is what its suffix says; None for
    suffixes with no known signature (then only a web page is refused)."""
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        return _safetensors_head(head, size)
    return head.startswith(_SIGNATURES[suffix]) if suffix in _SIGNATURES else None


def cache_dir():
    """The download cache folder: ``$KERAS_VIT_CACHE``, else ``keras_vit`` in ``$KERAS_HOME`` (``~/.keras``)."""
    default = Path(os.environ.get("KERAS_HOME", "~/.keras")) / "keras_vit"
    return Path(os.environ.get("KERAS_VIT_CACHE", default)).expanduser()


class CacheFolderError(OSError):
    """The download cache folder cannot hold files: ``folder``, ``variable`` (the environment variable that set
    it, None for the default), ``reason`` and ``errno`` (the operating system's)."""

    def __init__(self, folder, variable, reason, errno=None):
        self.folder, self.variable, self.reason = Path(folder), variable, reason
        setting = f"set by {variable}={os.environ.get(variable, '')}" if variable else "the default"
        super().__init__(
            f"The download cache folder {folder} ({setting}) cannot be used: {reason}. Set KERAS_VIT_CACHE to a "
            "folder you can write to (it is created if missing), or unset it to use ~/.keras/keras_vit."
        )
        self.errno = errno


def _usable_cache_dir():
    """``cache_dir()``, created; an ``OSError`` naming the variable that set it when it cannot hold files."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no permission to write in {folder}")
    except OSError as error:
        variable = next((v for v in ("KERAS_VIT_CACHE", "KERAS_HOME") if v in os.environ), None)
        if folder.is_file():
            reason = "it is a file, not a folder"
        elif isinstance(error, (NotADirectoryError, FileExistsError)):
            reason = "a folder above it is a file"
        else:
            reason = error.strerror or str(error)
        raise CacheFolderError(folder, variable, reason, error.errno) from None
    return folder


def _folder_and_file(url, quoted=False):
    """The URL path's last folder and file joined with ``--`` (URL quoting removed unless ``quoted``); may hold
    any character, ``/`` and ``..`` included: never a file name as it is (``cached_name``)."""
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    name = "--".join(parts[-2:]) if len(parts) > 1 else (parts[-1] if parts else "download")
    return name if quoted else urllib.parse.unquote(name)


def _plain_name(text):
    """``text`` as one plain file name of the cache: each run of characters other than ASCII letters, digits and
    ``. _ + = -`` becomes ``_`` (path separators of every platform, NUL, ``%``), leading dots are dropped (no
    ``..``, no hidden file); ``"download"`` when nothing is left."""
    return _UNSAFE.sub("_", text).lstrip(".") or "download"


def file_suffix(name):
    """A file name's suffix, ``.weights.h5`` counted as one: ``"vit.weights.h5"`` -> ``".weights.h5"``."""
    return ".weights.h5" if name.endswith(".weights.h5") else Path(name).suffix


def cached_name(url, name=None):
    """The cache file name of ``url``: folder and file joined (or ``name``, a readable name the caller gives, such
    as a Hub repository's and file's) and a digest of the URL, e.g.
    ``imagenet21k+imagenet2012--ViT-B_16--3f0c5e9a1b7d2c64.npz`` (the suffix kept last).

    Always one plain file name of at most ``MAX_NAME`` characters (``_plain_name``; the folder and file part is
    shortened when needed), whatever the URL or ``name`` holds: it cannot name another folder.
    """
    name = _plain_name(name or _folder_and_file(url))
    suffix = file_suffix(name)
    suffix = suffix if len(suffix) <= _MAX_SUFFIX else ""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    stem = name[: len(name) - len(suffix)][: MAX_NAME - len(suffix) - len(digest) - 2]
    return f"{stem}--{digest}{suffix}"


def _older_names(url):
    """Names older versions cached ``url`` under, where they mean that URL alone: the official bucket's (only
    plain file names: a name that could reach another folder is never looked at)."""
    if not url.startswith(BUCKET):
        return []
    names = (_folder_and_file(url), _folder_and_file(url, quoted=True))
    return [name for name in names if len(name) <= MAX_NAME and _OLD_NAME.fullmatch(name)]


def _cache_file(folder, name):
    """``folder / name`` after checking that its resolved folder is the cache ``folder`` (before a byte is written)."""
    target = folder / name
    if target.name != name or target.parent.resolve() != folder.resolve():
        raise ValueError(f"The cache name {name!r} does not name a file in the cache folder {folder}.")
    return target


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


class UnsafeRedirectError(ValueError):
    """A server redirected a download to another host over plain http, or from https to http: ``url`` (the
    address asked for), ``location`` (where it was sent)."""

    def __init__(self, url, location):
        self.url, self.location = url, location
        super().__init__(
            f"Downloading {url}: the server redirected to {location}, which is not allowed (a redirect may go to "
            "the same host, or to another host over https). Nothing was cached. Download the file yourself if "
            "you trust that address, and pass its path as weights=."
        )


class HashMismatchError(ValueError):
    """A file does not have the expected SHA-256: ``source`` (the URL), ``path``, ``expected``, ``found`` and
    ``deleted`` (whether the file was a download, and was deleted)."""

    def __init__(self, source, path, expected, found, deleted):
        self.source, self.path, self.expected, self.found, self.deleted = source, path, expected, found, deleted
        what = (
            f"The file downloaded from {source} does not have the expected sha256 {expected}; it was deleted. "
            "Retry the download; if it fails again the file on the server has changed."
            if deleted else f"{path} (from {source}) does not have the expected sha256 {expected}; it is left as it is."
        )
        super().__init__(what)


def _check_redirect(url, location):
    """Refuses (``UnsafeRedirectError``) a redirect from ``url`` to ``location`` other than to https, or within
    the same host over http."""
    old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(location)
    if not (new.scheme == "https" or (new.scheme == old.scheme == "http" and new.hostname == old.hostname)):
        raise UnsafeRedirectError(url, location)
    if new.hostname != old.hostname:
        log.info("Downloading %s from %s (redirected).", url, new.hostname)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Checks each redirect (``_check_redirect``) and keeps the headers of the responses that redirected
    (``seen``), where the Hugging Face Hub sends a file's SHA-256 before sending the download elsewhere."""

    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_redirect(req.full_url, newurl)
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _announced_sha256(responses, header):
    """The SHA-256 the first of ``responses`` (header mappings) that has ``header`` announces (a 64-digit hex
    value, quoted or weak as ETags are); None when none does."""
    for headers in responses:
        match = _SHA256.match((headers.get(header) or "").strip().lower())
        if match:
            return match.group(1)
    return None


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
    expected = _looks_like(name, head, received)
    looks_like_page = content_type == "text/html" or head.lstrip()[:1] == b"<"
    if expected is False or (expected is None and looks_like_page):
        what = "a web page" if looks_like_page else "a file"
        raise _Refused(
            f"the server sent {what} ({content_type}, starting {head[:12]!r}), not the {file_suffix(name) or 'file'} "
            "expected: the address is wrong or needs a login (e.g. a sharing page rather than the direct link)"
        )


def _download(url, target, timeout, deadline):
    """Streams ``url`` to ``target`` through a temporary beside it, within ``deadline`` seconds in all; returns
    the headers of every response on the way (redirects first)."""
    deadline_at = time.monotonic() + deadline
    redirects = _CheckedRedirects()
    opener = urllib.request.build_opener(redirects)
    with atomic_file(target, suffix=_PART) as temporary:
        with open(temporary, "wb") as file, opener.open(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            content_type = response.headers.get_content_type()
            received = _copy(response, file, deadline_at, deadline)
        _check_arrival(temporary, target.name, received, int(length) if length else None, content_type)
    return [*redirects.seen, response.headers]


def _local_file(url, sha256):
    """The local file a ``file://`` URL names, read in place (checked against ``sha256``, never deleted)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url} names a file on another machine ({parts.netloc}): copy or mount it, and pass its path.")
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {path} (from {url}) does not exist.")
    if sha256 is not None:
        found = sha256_of(path)
        if found != sha256:
            raise HashMismatchError(url, path, sha256, found, deleted=False)
    return path


def _cached(candidate, sha256):
    """Whether the cache file ``candidate`` is there and usable: a regular file, not a symbolic link (which is
    never read), with the expected ``sha256``; a damaged copy is deleted."""
    if candidate.is_symlink():
        log.warning("%s is a symbolic link (to %s): not used; the file is downloaded in its place.",
                    candidate, os.readlink(candidate))
        return False
    if not candidate.is_file():
        return False
    if sha256 is None or sha256_of(candidate) == sha256:
        return True
    candidate.unlink()  # a stale or damaged copy: download it again
    return False


def cached(url, sha256=None, name=None):
    """The path ``fetch(url, sha256, name=name)`` would return without downloading: the usable cached file, or
    None (nothing is downloaded; a ``file://`` URL's file when it exists)."""
    if urllib.parse.urlsplit(url).scheme.lower() == "file":
        try:
            return _local_file(url, sha256)
        except FileNotFoundError:
            return None
    folder = cache_dir()
    if not folder.is_dir():
        return None
    for candidate in [_cache_file(folder, cached_name(url, name))] + [_cache_file(folder, n) for n in _older_names(url)]:
        if _cached(candidate, sha256):
            return candidate
    return None


def fetch(url, sha256=None, timeout=DOWNLOAD_TIMEOUT_S, deadline=DOWNLOAD_DEADLINE_S, name=None, sha256_header=None):
    """Downloads ``url`` into the cache (once) and returns the local path; a ``file://`` URL's file is read in
    place (its path is returned).

    ``timeout``: seconds to connect and to wait for each piece of data;
    ``deadline``: seconds for the whole download (checked whenever data
    arrives, so it ends within ``deadline + timeout``). A URL that cannot be
    reached, a download that is too slow or cut short is a ``ConnectionError``
    saying where to place the file by hand; a web page (or another file
    than the name says) is a ``ValueError``, a refused redirect an
    ``UnsafeRedirectError``; in these cases nothing is cached. With
    ``sha256`` the file is verified after download (and when found in the
    cache); a mismatch deletes a downloaded file and raises
    ``HashMismatchError``. Without ``sha256``, ``sha256_header`` names a
    response header that announces it (the Hugging Face Hub's
    ``X-Linked-Etag``, sent with the redirect to its storage): a download is
    verified against it when a response sent one. ``name``: the readable
    part of the cache name (``cached_name``); the URL's folder and file by
    default. A cache folder that cannot hold files is an ``OSError`` naming
    the variable that chose it.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"Cannot download {url}: the URL schemes read are {', '.join(SCHEMES)}.")
    if scheme == "file":
        return _local_file(url, sha256)
    folder = _usable_cache_dir()
    target = _cache_file(folder, cached_name(url, name))
    for candidate in [target] + [_cache_file(folder, old) for old in _older_names(url)]:
        if _cached(candidate, sha256):
            return candidate
    _remove_stale_temporaries(folder)
    try:
        responses = _download(url, target, timeout, deadline)
    except _Refused as refusal:
        raise ValueError(f"Downloading {url}: {refusal}. Nothing was cached.") from None
    except UnsafeRedirectError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError, timeouts, refusals: OSErrors
        raise ConnectionError(
            f"Could not download {url} ({error}); nothing was cached. Retry, or without network access download "
            f"it elsewhere and place it at {target} (the cache folder is set by KERAS_VIT_CACHE), or pass the "
            "local file path as weights=."
        ) from None
    if sha256 is None and sha256_header is not None:
        sha256 = _announced_sha256(responses, sha256_header)
    if sha256 is not None:
        found = sha256_of(target)
        if found != sha256:
            target.unlink()
            raise HashMismatchError(url, target, sha256, found, deleted=True)
    return target
