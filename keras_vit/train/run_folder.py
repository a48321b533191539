"""An output folder's bookkeeping: the lock held by the live run and the settings its checkpoints were written with.

``lock(folder)`` is a context manager around ``folder/.lock``: the file holds
the pid and host of the run, and an exclusive ``flock`` on it lives as long
as that process, so a lock left by a killed run (kill -9, power loss) is
taken over by the next one, while a second live run is refused with the
folder and the first run's pid. Locks need ``fcntl`` (Linux, macOS).

``check_settings(folder, settings)`` compares the settings a run is started
with to those stored in ``folder/settings.json`` by the run that wrote the
checkpoints, and names every difference.
"""

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

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
    """The settings stored in ``folder/settings.json`` (dict), or None."""
    path = Path(folder) / SETTINGS_NAME
    return json.loads(path.read_text()) if path.exists() else None


def store_settings(folder, settings):
    Path(folder).mkdir(parents=True, exist_ok=True)
    temporary = Path(folder) / f".{SETTINGS_NAME}.tmp"
    temporary.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
    os.replace(temporary, Path(folder) / SETTINGS_NAME)


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
    """Raises ``ValueError`` naming the differing settings when ``folder`` holds checkpoints of other settings."""
    stored = stored_settings(folder)
    if stored is None:
        return
    changed = differences(stored, settings)
    if changed:
        raise SettingsMismatchError(
            f"{folder} holds checkpoints of another configuration ({'; '.join(changed)}): use a new output_dir, "
            "restore those settings to resume, or delete the folder's checkpoints to start over."
        )
