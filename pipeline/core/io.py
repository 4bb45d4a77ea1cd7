"""Atomic file writes: temp file in the same folder + fsync + rename, so a kill at any moment
leaves either the old file or the new one, never half of one.

A temp is named ``.{name}.{random}.{pid}-{host}.tmp`` (``host``: 8 hex digits of the host name's
CRC32), so a later run can tell a killed writer's leftover (``clean_stale_tmp``) from a live
writer's file: SIGKILL runs no ``finally``, and a leftover can be as large as the file it was
meant to become (k-means centroids at K = 1M: 3 GB).

Every file written gets the mode the umask gives a new file (0644 under the usual 022), set on
the temp right before the rename: a writer that replaces the temp (safetensors' ``save_file``
does) would otherwise leave mkstemp's 0600.

A URL (``s3://``, ``gs://``: ``pipeline/core/fs.py``) is written by one upload under its final
name (``atomic_path`` yields a local temp in ``$TMPDIR`` and uploads it when the block succeeds)
and read into memory (``load_npy``'s ``mmap`` does not apply)."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core import fs
from pipeline.core.errors import disk_full


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _local(path: str | os.PathLike) -> str | os.PathLike:
    """A ``file:`` URL as its path (``file:///x``, or ``file:/x`` after pathlib); else as given."""
    if str(path)[:5].lower() != "file:":
        return path
    return fs.local(path) or path


def _remote(path: str | os.PathLike) -> bool:
    """A URL for pipeline/core/fs.py."""
    s = str(path)
    if ":/" not in s or s.lower().startswith("file:"):
        return False
    return fs.is_remote(s)


def fs_url(path: str | os.PathLike) -> str:
    return fs.url_of(path)


@contextmanager
def _remote_path(url: str) -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=".mlcd-upload.", suffix=f".{os.getpid()}-{_HOST}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fs.put_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path``; renames it onto ``path`` if the block succeeds (a
    URL: uploads it as ``path``)."""
    if _remote(path):
        with _remote_path(fs_url(path)) as tmp:
            yield tmp
        return
    path = Path(_local(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}-{_HOST}.tmp",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; set after the block,
            os.fsync(f.fileno())                      # which may have replaced the file
        os.replace(tmp, path)
    except Exception as e:  # a full disk: one line naming the file (pipeline/core/errors.py)
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if _remote(path):
        fs.write_bytes(path, data)
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    if _remote(path):
        return np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False)
    return np.load(_local(path), mmap_mode="r" if mmap else None, allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    if _remote(path):
        return json.loads(fs.read_bytes(path))
    with open(_local(path)) as f:
        return json.load(f)


_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TAGGED = re.compile(r"^\..+\.[a-z0-9_]{8}\.(\d+)-([0-9a-f]{8})\.tmp$")  # atomic_path's temp names
_UNTAGGED = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # written before temps were tagged
UNTAGGED_STALE_S = 900.0  # an untagged/other host's temp untouched this long has no live writer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_tmp(p: Path, now: float | None = None) -> bool:
    """``p`` is an atomic-write temp whose writer is gone: this host's with a dead pid, or (another
    host's, or untagged) not modified for UNTAGGED_STALE_S (a live writer keeps writing it; we
    cannot see another host's processes). Any other name is never a stale temp."""
    m = _TAGGED.match(p.name)
    if m and m.group(2) == _HOST:
        return not _pid_alive(int(m.group(1)))
    if not (m or _UNTAGGED.match(p.name)):
        return False
    try:
        return (now or time.time()) - p.lstat().st_mtime > UNTAGGED_STALE_S
    except FileNotFoundError:
        return False


def clean_stale_tmp(folder: str | os.PathLike, recursive: bool = False, skip_marker: str | None = None) -> int:
    """Removes temp files killed writers left in ``folder`` (``is_stale_tmp``); returns how many.
    ``recursive``: also below it, except in folders holding ``skip_marker`` (another live stage's
    lock: its own start cleans them). Never follows symlinks; a live writer's temp is kept."""
    root, n = Path(folder), 0
    if not root.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        if recursive and skip_marker:
            dirnames[:] = [d for d in dirnames if not (Path(dirpath, d) / skip_marker).exists()]
        elif not recursive:
            dirnames[:] = []
        for name in filenames:
            p = Path(dirpath, name)
            if name.endswith(".tmp") and not p.is_symlink() and is_stale_tmp(p):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
