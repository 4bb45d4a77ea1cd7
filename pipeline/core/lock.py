"""One writer per output folder: ``{out_dir}/.mlcd.lock`` names the run that writes there.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds the
owner's pid, host and start time as JSON. A second run on the same folder is refused with one
line naming the owner. A lock whose pid is dead on this host is stale (a killed run: SIGKILL
runs no cleanup), as is one whose pid now belongs to a process started later (pid reuse), and
is taken over; a lock from another host is never broken automatically
(we can't see its processes): delete the file if that run is gone. Released on exit.

In a distributed stage only rank 0 takes it (``hold``); the outcome is broadcast so every rank
stops with the same error. Cost: a few small file operations per stage run.

Holding the lock, ``hold`` removes the temp files killed writers left in the folder's tree
(``pipeline.core.io.clean_stale_tmp``: atomic-write temp names only, a live writer's kept, folders
under another live lock skipped) before any rank starts work.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import InputError
from pipeline.core.io import clean_stale_tmp

log = logging.getLogger("mlcd.lock")
LOCK_NAME = ".mlcd.lock"
_EMPTY_GRACE_S = 30.0  # a lock file with no content yet is being written (or its writer died)
_CREATED: dict[Path, list[Path]] = {}  # folders acquire() made, deepest first


class LockError(InputError):
    """Another live run holds the folder (one line for the user)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a pid reused by another
    process after the owner died is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(o: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o.get("start", 0)))
    return f"pid {o.get('pid')} on {o.get('host')} since {since} ({o.get('what', '?')})"


def _stale(path: Path, owner: dict | None) -> bool:
    if owner is None:  # empty or garbled: stale once it is old enough not to be mid-write
        try:
            return time.time() - path.stat().st_mtime > _EMPTY_GRACE_S
        except FileNotFoundError:
            return True
    if owner.get("host") != socket.gethostname():
        return False
    pid = int(owner.get("pid", -1))
    if not _alive(pid):
        return True
    started = owner.get("proc_start")
    return started is not None and _proc_start(pid) not in (None, started)  # pid reused


def acquire(folder: str | os.PathLike, what: str = "") -> Path:
    """Takes ``folder``'s lock or raises LockError naming the owner."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    _CREATED[path] = created  # removed again on release if still empty (a run refused on input)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time(), "what": what,
          "proc_start": _proc_start(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if not _stale(path, owner):
                raise LockError(f"{folder} is in use by {_describe(owner or {})}: one run per output "
                                f"folder; stop that run first (or delete {path} if it is gone)") from None
            # stale: move it aside under a unique name (only one of racing takers succeeds)
            log.warning("%s: taking over a stale lock (%s)", folder, _describe(owner or {}))
            try:
                os.rename(path, folder / f"{LOCK_NAME}.stale.{os.getpid()}")
                os.unlink(folder / f"{LOCK_NAME}.stale.{os.getpid()}")
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return path
    raise LockError(f"{folder}: could not take {path} (another run keeps taking it)")


def release(path: Path) -> None:
    """Removes the lock if it is still ours (never another run's)."""
    o = _owner(path)
    if o and o.get("pid") == os.getpid() and o.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
        for d in _CREATED.pop(path, []):
            try:
                d.rmdir()  # only if the run wrote nothing there
            except OSError:
                break


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "") -> Iterator[Path]:
    path = acquire(folder, what)
    try:
        yield path
    finally:
        release(path)


def _clean(folder: str | os.PathLike) -> None:
    try:
        n = clean_stale_tmp(folder, recursive=True, skip_marker=LOCK_NAME)
    except OSError as e:  # cleaning is a courtesy: an unreadable subfolder must not stop the stage
        log.warning("%s: could not remove stale temp files: %s", folder, e)
        return
    if n:
        log.info("%s: removed %d temp file(s) left by a killed run", folder, n)


@contextmanager
def hold(folder: str | os.PathLike, ctx, what: str = "") -> Iterator[None]:
    """Collective: rank 0 holds ``folder``'s lock for the block; every rank raises the same
    LockError if it is refused (no rank left waiting at a collective)."""
    path, err = None, None
    if ctx.is_main:
        try:
            path = acquire(folder, what)
        except (LockError, OSError) as e:
            err = str(e)
        if path is not None:
            _clean(folder)
    err = ctx.broadcast_object(err)
    if err:
        raise LockError(err)
    try:
        yield
    finally:
        if path is not None:
            release(path)
