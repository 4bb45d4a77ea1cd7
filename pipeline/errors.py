"""User-facing error classes of every stage (no imports: every layer may raise them).

``StageError``: ``str(e)`` is the one line printed, ``exit_code`` 1 (bad input) or 2 (bad
config/arguments). ``pipeline/entry.py`` (``stage_cli``) turns them into that line and exit code;
``pipeline.config.ConfigError`` is always 2. Modules subclass these for their own errors.
"""
from __future__ import annotations


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
