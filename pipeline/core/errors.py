"""User-facing error classes of every stage (stdlib imports only: every layer may raise them).

``StageError``: ``str(e)`` is the one line printed, ``exit_code`` 1 (bad input) or 2 (bad
config/arguments). ``pipeline/core/entry.py`` (``stage_cli``) turns them into that line and exit code;
``pipeline.core.config.ConfigError`` is always 2. Modules subclass these for their own errors.
A full disk (ENOSPC/EDQUOT, however a writer reports it) becomes ``DiskFull`` (exit 1).
"""
from __future__ import annotations

import errno
import shutil


class StageError(Exception):
    """A user-facing stage failure (one line, an exit code; anything else keeps its traceback)."""
    exit_code = 1
    label = "error"

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def __reduce__(self):  # survives DistContext.agree's broadcast with its code
        return (_rebuild, (type(self), str(self), self.exit_code))


def _rebuild(cls, message, code):
    e = cls.__new__(cls)
    StageError.__init__(e, message, code)
    return e


class InputError(StageError, ValueError):
    """Bad input data or a refused run folder (exit 1)."""
    exit_code = 1


class DiskFull(InputError):
    """A write ran out of space: one line naming the path, exit 1. What was written before is
    intact (every output is written atomically: a temp file renamed onto its name)."""


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# torch.save reports a failed write without its errno ("unexpected pos", "file write failed",
# "iostream error"): taken as a full disk only when the folder it wrote has under 1 MiB free.
_TORCH_WRITE = ("PytorchStreamWriter", "inline_container.cc", "iostream error", "file write failed")


def disk_full(e: BaseException | None, path=None) -> DiskFull | None:
    """The one-line DiskFull for an out-of-space error (``e`` or anything in its cause chain:
    an OSError with ENOSPC/EDQUOT, a library's message saying so, a torch write failure on a
    folder with < 1 MiB free), else None. ``path``: the file being written, when known."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull):
            return e
        text = str(e)
        full = (isinstance(e, OSError) and e.errno in _FULL) or any(t in text for t in _FULL_TEXT)
        if not full and path is not None and any(t in text for t in _TORCH_WRITE):
            full = _free_bytes(path) < 2**20
        if full:
            where = path or getattr(e, "filename", None) or "an output file"
            return DiskFull(f"{where}: no space left on device (files written before are intact: "
                            "outputs are written atomically); free space and rerun")
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(path) -> int:
    from pathlib import Path
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 1 << 62


class ConfigError(ValueError):
    """A bad configuration: the message is a single line for the user (exit 2). Defined here so
    that modules below config (netpolicy, fs) need no import of config; use it as
    ``pipeline.core.config.ConfigError``."""
