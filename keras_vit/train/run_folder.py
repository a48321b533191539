"""An output folder's bookkeeping: the lock held by the live run and the settings its checkpoints were written with.

``lock(folder)`` is a context manager around ``folder/.lock``: the file holds
the pid and host of the run, and an exclusive ``flock`` on it lives as long
as that process, so a lock left by a killed run (kill -9, power loss) is
taken over by the next one, while a second live run is refused with the
folder and the first run's pid. Locks need ``fcntl`` (Linux, macOS).

``check_settings(folder, settings)`` compares the settings a run is started
with to those stored in ``folder/settings.json`` by the run that wrote the
checkpoints (upgraded from the schema version that stored them), and names
every difference; settings that only say how steps are computed or data is
fed (``RESUMABLE_SETTINGS``: ``jit_compile``, ``steps_per_execution``,
``cache``, ``shuffle_buffer``) may differ. ``settings.json`` holds the schema
version, the run id the checkpoints carry, the training settings and the
training loop and backend that wrote them (``written_by``). An unreadable
``settings.json`` (empty, cut short) counts as missing, with a warning.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from keras_vit.files import atomic_file
from keras_vit.train import settings as settings_schema

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
SETTINGS_NAME = "settings.json"
TEMPORARIES = (f".{SETTINGS_NAME}.tmp",)  # what a killed store_settings leaves


class FolderInUseError(RuntimeError):
    """Another live run holds the output folder."""


class FolderNotWritableError(OSError):
    """The output folder cannot be created or written: ``folder``, with the ``errno`` and ``strerror`` of the cause."""

    def __init__(self, folder, cause):
        self.folder = Path(folder)
        super().__init__(cause.errno, cause.strerror or str(cause), str(folder))

    def __str__(self):
        return f"Output folder {self.folder} cannot be written ({self.strerror}): choose an output_dir you can write to."


class SettingsMismatchError(ValueError):
    """The folder's checkpoints were written with other settings: ``folder`` and ``differences`` (one line each)."""

    def __init__(self, folder, differences, advice="use a new output_dir, restore those settings to resume, or "
                 "delete the folder's checkpoints to start over"):
        self.folder, self.differences = Path(folder), list(differences)
        super().__init__(f"{folder} holds checkpoints of another configuration ({'; '.join(self.differences)}): {advice}.")


class LoopMismatchError(SettingsMismatchError):
    """The folder's checkpoints were written by another training loop: ``stored`` and ``current``, each a dict of
    ``loop`` and ``backend``."""

    def __init__(self, folder, stored, current):
        self.stored, self.current = dict(stored), dict(current)
        where = f" on {stored['backend']}" if stored.get("backend") else ""
        difference = f"loop: {stored['loop']!r}{where} in the folder, {current['loop']!r} on {current['backend']} now"
        fix = "KERAS_BACKEND=tensorflow" if stored["loop"] == "trainer" else "loop='fit'"
        super().__init__(folder, [difference], advice=(
            f"resume it with {fix} (the loops compute the steps otherwise and log other columns), or use a new "
            "output_dir"))


@contextlib.contextmanager
def lock(folder):
    """Holds ``folder/.lock`` (creating ``folder``) for the ``with`` block; raises ``FolderInUseError`` when taken."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        log.warning("Output folder %s is not locked: this platform has no fcntl.", folder)
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as error:  # read-only, a file in the way, no space: before anything is computed
            raise FolderNotWritableError(folder, error) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown pid"
            handle.close()
            raise FolderInUseError(
                f"Output folder {folder} is in use by another run ({holder}): wait for it to end, stop it, "
                "or choose another output_dir."
            ) from None
        if path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            break
        handle.close()  # the previous holder removed the file while we waited for it: lock the new one
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
        log.info("Took over the lock of %s from an ended run (%s).", folder, stale)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _record(folder):
    """The JSON object of ``folder/settings.json``; None when missing, or unreadable (logged)."""
    path = Path(folder) / SETTINGS_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or ("schema_version" in record and not isinstance(record.get("settings"), dict)):
            raise ValueError("not an object of settings")
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): it counts as missing.", path, error)
        return None
    return record


def stored_settings(folder):
    """``(schema_version, run_id, settings)`` stored in ``folder/settings.json``, or None (missing or unreadable).

    Folders written before settings had a schema version (version 1) hold the bare settings and no run id.
    """
    record = _record(folder)
    if record is None:
        return None
    if "schema_version" not in record:
        return 1, None, record
    return record["schema_version"], record.get("run_id"), record["settings"]


def written_by(folder):
    """``{"loop": ..., "backend": ...}`` that wrote the checkpoints of ``folder``, as stored; None when not stored."""
    record = _record(folder)
    return record.get("written_by") if record else None


def run_id(settings):
    """A short hash of the training settings (paths to local files resolved; ``RESUMABLE_SETTINGS`` left out,
    since a run resumes with other values of them): a new run's id."""
    canonical = settings_schema.canonical(settings)
    identity = {k: v for k, v in canonical.items() if k not in settings_schema.RESUMABLE_SETTINGS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_settings(folder, settings, run=None, loop=None):
    """Writes ``folder/settings.json`` (schema version, run id, settings and ``loop``, the ``written_by`` dict);
    returns the run id (``run`` or a new one)."""
    run = run or run_id(settings)
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {"schema_version": settings_schema.SCHEMA_VERSION, "run_id": run, "settings": settings}
    if loop is not None:
        record["written_by"] = dict(loop)
    with atomic_file(Path(folder) / SETTINGS_NAME, temporary=Path(folder) / TEMPORARIES[0]) as temporary:
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return run


def differences(stored, settings):
    """``["key: <stored> in the folder, <new> now", ...]`` for every setting that differs."""
    keys = sorted(set(stored) | set(settings))
    missing = object()
    lines = []
    for key in keys:
        old, new = stored.get(key, missing), settings.get(key, missing)
        if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
            describe = lambda v: "unset" if v is missing else json.dumps(v, sort_keys=True, default=str)  # noqa: E731
            lines.append(f"{key}: {describe(old)} in the folder, {describe(new)} now")
    return lines


def check_settings(folder, settings):
    """Refuses (``SettingsMismatchError`` naming every difference) when ``folder`` holds other training settings.

    Settings stored by an older schema version are upgraded first (``keras_vit.train.settings.upgrade``: a
    setting added since takes its default), and paths to local files are compared resolved. Other values of
    ``RESUMABLE_SETTINGS`` are allowed (logged). Returns the folder's run id (None for a folder of schema
    version 1, whose checkpoints hold it) or None without settings.
    """
    stored = stored_settings(folder)
    if stored is None:
        return None
    version, run, old = stored
    old, new = settings_schema.canonical(settings_schema.upgrade(old, version)), settings_schema.canonical(settings)
    resumable = set(settings_schema.RESUMABLE_SETTINGS)
    changed = differences({k: v for k, v in old.items() if k not in resumable}, {k: v for k, v in new.items() if k not in resumable})
    if changed:
        raise SettingsMismatchError(folder, changed)
    allowed = differences({k: old.get(k) for k in resumable}, {k: new.get(k) for k in resumable})
    if allowed:
        log.info("Resuming %s with other execution settings (%s).", folder, "; ".join(allowed))
    return run
