"""Hugging Face Hub ids (``hf-hub:timm/<architecture>.<tag>``): the local Hugging Face cache, else a download.

``resolve(hub_id)`` gives the local paths of the repository's ``model.safetensors`` and ``config.json``:

* from the Hugging Face cache when both are there, as ``huggingface_hub`` lays it out:
  ``<cache>/models--<owner>--<name>/snapshots/<commit>/<file>``, the commit read from ``refs/<revision>``
  (``main`` unless the id ends in ``@<revision>``); ``<cache>`` is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
  else ``~/.cache/huggingface/hub`` (``$XDG_CACHE_HOME/huggingface/hub`` when that is set);
* otherwise from ``<endpoint>/<owner>/<name>/resolve/<revision>/<file>`` through keras_vit's download cache
  (``keras_vit.pretrained.download.fetch``: deadlines, web pages and truncation refused, atomic; cached as
  ``<owner>--<name>--<file>--<digest>``; verified against the SHA-256 the Hub announces in ``X-Linked-Etag``
  for files stored with Git LFS, as ``model.safetensors`` is). The endpoint is
  the ``endpoint`` argument, else ``$HF_ENDPOINT``, else https://huggingface.co. With ``$HF_HUB_OFFLINE`` set,
  nothing is downloaded.

Ids are checked before any path is built from them (no ``..``, no separators outside ``owner/name``).
"""

import os
import re
import urllib.parse
from pathlib import Path

from keras_vit.pretrained import download

PREFIXES = ("hf-hub:", "hf_hub:")  # timm accepts both
ENDPOINT = "https://huggingface.co"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SHA256_HEADER = "X-Linked-Etag"  # the Hub's SHA-256 of a file stored with Git LFS, sent with the redirect to storage
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w.-]+(/[\w.-]+)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = ("1", "on", "yes", "true")


def is_hub_id(source):
    """Whether ``source`` is a Hub id (``hf-hub:owner/name``)."""
    return isinstance(source, str) and source.startswith(PREFIXES)


def parse_hub_id(hub_id):
    """``(repo, revision)`` of ``hf-hub:owner/name[@revision]``; ``ValueError`` for an id that cannot be one."""
    repo, _, revision = hub_id.split(":", 1)[1].partition("@")
    revision = revision or "main"
    bad = (not _REPO.match(repo) or ".." in repo or "--" in repo
           or not _REVISION.match(revision) or ".." in revision.split("/"))
    if bad:
        raise ValueError(
            f"{hub_id!r} is not a Hugging Face Hub id: write hf-hub:<owner>/<name>[@<revision>], e.g. "
            "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k."
        )
    return repo, revision


def hub_cache_dir():
    """The Hugging Face cache folder: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_files(repo, revision="main"):
    """``(model.safetensors, config.json)`` of ``repo`` at ``revision`` in the Hugging Face cache, or None."""
    folder = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    commit = revision
    if not _COMMIT.match(revision):
        try:
            commit = (folder / "refs" / revision).read_text().strip()
        except OSError:
            return None
        if not _COMMIT.match(commit):
            return None
    files = tuple(folder / "snapshots" / commit / name for name in (WEIGHTS_NAME, CONFIG_NAME))
    return files if all(path.is_file() for path in files) else None


def file_url(repo, revision, name, endpoint=None):
    """The download URL of file ``name`` of ``repo`` at ``revision``."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or ENDPOINT).rstrip("/")
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{name}"


def resolve(hub_id, endpoint=None):
    """Local ``(model.safetensors, config.json)`` paths of a Hub id: cached, else downloaded (see the module).

    A file that cannot be downloaded is ``download.fetch``'s ``ConnectionError``; with ``$HF_HUB_OFFLINE`` set,
    files missing from the caches are a ``FileNotFoundError``.
    """
    repo, revision = parse_hub_id(hub_id)
    cached = cached_files(repo, revision)
    if cached is not None:
        return cached
    files = [(file_url(repo, revision, name, endpoint), f"{repo.replace('/', '--')}--{name}")
             for name in (WEIGHTS_NAME, CONFIG_NAME)]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        found = [download.cached(url, name=name) for url, name in files]
        if None in found:
            raise FileNotFoundError(
                f"{hub_id} is neither in the Hugging Face cache ({hub_cache_dir()}) nor in keras_vit's download "
                "cache, and HF_HUB_OFFLINE is set: download it where the network is reachable "
                f"(huggingface-cli download {repo}), or unset HF_HUB_OFFLINE."
            )
        return tuple(found)
    return tuple(download.fetch(url, name=name, sha256_header=SHA256_HEADER) for url, name in files)
