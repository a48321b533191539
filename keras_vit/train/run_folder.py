"""An output folder's bookkeeping: the lock held by the live run and the settings its checkpoints were written with.

``lock(folder)`` is a context manager around ``folder/.lock``: the file holds
the pid and host of the run, and an exclusive ``flock`` on it lives as long
as that process, so a lock left by a killed run (kill -9, power loss) is
taken over by the next one, while a second live run is refused with the
folder and the first run's pid. Locks need ``fcntl`` (Linux, macOS).

``check_settings(folder, settings)`` compares the settings a run is started
with to those stored in ``folder/settings.json`` by the run that wrote the
checkpoints (upgraded from the schema version that stored them), and names
every difference. ``settings.json`` holds the schema version, the run id the
checkpoints carry, and the training settings.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from keras_vit.train import settings as settings_schema

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
SETTINGS_NAME = "settings.json"


class FolderInUseError(RuntimeError):
    """Another live run holds the output folder."""


class SettingsMismatchError(ValueError):
    """The folder's checkpoints were written with other settings."""


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
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        handle = open(path, "a+")
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


def stored_settings(folder):
    """``(schema_version, run_id, settings)`` stored in ``folder/settings.json``, or None.

    Folders written before settings had a schema version (version 1) hold the bare settings and no run id.
    """
    path = Path(folder) / SETTINGS_NAME
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if "schema_version" not in record:
        return 1, None, record
    return record["schema_version"], record["run_id"], record["settings"]


def run_id(settings):
    """A short hash of the training settings (paths to local files resolved): a new run's id."""
    canonical = settings_schema.canonical(settings)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_settings(folder, settings, run=None):
    """Writes ``folder/settings.json`` (schema version, run id, settings); returns the run id (``run`` or a new one)."""
    run = run or run_id(settings)
    Path(folder).mkdir(parents=True, exist_ok=True)
    temporary = Path(folder) / f".{SETTINGS_NAME}.tmp"
    record = {"schema_version": settings_schema.SCHEMA_VERSION, "run_id": run, "settings": settings}
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(temporary, Path(folder) / SETTINGS_NAME)
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
    setting added since takes its default), and paths to local files are compared resolved. Returns the
    folder's run id (None for a folder of schema version 1, whose checkpoints hold it) or None without settings.
    """
    stored = stored_settings(folder)
    if stored is None:
        return None
    version, run, old = stored
    changed = differences(
        settings_schema.canonical(settings_schema.upgrade(old, version)), settings_schema.canonical(settings)
    )
    if changed:
        raise SettingsMismatchError(
            f"{folder} holds checkpoints of another configuration ({'; '.join(changed)}): use a new output_dir, "
            "restore those settings to resume, or delete the folder's checkpoints to start over."
        )
    return run
