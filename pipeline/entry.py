"""The one entry path of every stage: ``python -m <stage>`` -> ``cli_main`` -> ``main(config,
overrides)`` -> ``run_distributed(fn, run, cfg)`` -> ``fn(run, cfg, ctx)``.

- ``cli_main`` parses ``--config FILE key=value ...`` and turns user errors into one line on
  stderr and an exit code: 2 for a bad config (``ConfigError``, or a ``StageError`` whose
  ``exit_code`` is 2), 1 for bad input (a ``StageError``: an unreadable store, failed shards, a
  refused weights file, ...; and a full disk, however the writer reports it: ``DiskFull``).
  Every rank prints and exits the same way, so under torchrun no rank is left waiting and the
  launcher only sees non-zero exits (``launch/cli.py`` reports those without a traceback).
- ``run_distributed`` builds the ``DistContext`` once, sets up per-rank logging, runs the stage
  and always destroys the process group, also on errors.

Per-stage setup that every stage needs goes in ``run_distributed``, before ``fn`` runs: it is
the single place all stages pass through with a context in hand. Today: the network/shell policy
and the output-folder lock (``pipeline/guard.py``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import ConfigError
from pipeline.dist import DistContext, destroy, init_distributed
from pipeline.errors import InputError, StageError, disk_full  # noqa: F401 -- re-exported: the stages' error base
from pipeline.guard import stage_guard
from pipeline.tracking import StageStatus, setup_logging


def exit_code(e: BaseException) -> int | None:
    """The exit code of a user error, None for a bug (which keeps its traceback)."""
    if isinstance(e, ConfigError):
        return 2
    if isinstance(e, StageError):
        return e.exit_code
    return None


def report(e: BaseException) -> int | None:
    """Prints a user error as one line (prefixed by its kind) and returns its exit code. Rank 0
    alone prints an error every rank has: a copy of rank 0's (``DistContext.agree``) or a bad
    config (every rank reads the same file and overrides)."""
    code = exit_code(e)
    shared = getattr(e, "agreed", False) or isinstance(e, ConfigError)
    if code is not None and not (shared and os.environ.get("RANK", "0") != "0"):
        label = "config error" if isinstance(e, ConfigError) else getattr(e, "label", "error")
        print(f"{label}: {e}", file=sys.stderr, flush=True)
    return code


def cli_main(main: Callable[[str | None, list[str]], Any], argv: Sequence[str] | None = None,
             prog: str | None = None):
    """Shared ``python -m <stage>`` entry: ``--config FILE [key=value ...]``; user errors exit 1/2."""
    parser = argparse.ArgumentParser(prog=prog or main.__module__)
    parser.add_argument("--config", "-c", default=None, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--instance", default=None, help="the run file's `<section>@NAME:` over `<section>:`")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. embed.batch_size=64")
    args = parser.parse_args(argv)
    try:  # only stages whose main takes an instance accept --instance
        return main(args.config, args.overrides, **({"instance": args.instance} if args.instance else {}))
    except (ConfigError, StageError) as e:
        sys.exit(report(e))
    except Exception as e:  # a full disk is one line too (exit 1); anything else a bug: traceback
        full = disk_full(e)
        if full is None:
            raise
        sys.exit(report(full))


def run_distributed(fn: Callable[..., Any], run, cfg, *, lock_dir=None, **kwargs) -> Any:
    """Builds the context once, logs per rank, runs ``fn(run, cfg, ctx)`` and always tears the
    process group down (also on errors). The stage runs under ``pipeline.guard.stage_guard``:
    the run's network/shell policy always (``run.allow_*``), and the lock on ``lock_dir`` (the
    stage's output folder) when given, so two runs never write into one folder."""
    ctx: DistContext = init_distributed()
    setup_logging(ctx, getattr(run, "log_every_s", None))
    try:
        if run is None:  # a tool without a run config (envcheck): no policy, no folder
            out = fn(run, cfg, ctx, **kwargs)
        else:
            with stage_guard(run, lock_dir, ctx, fn.__module__), StageStatus(lock_dir, fn.__module__, ctx):
                out = fn(run, cfg, ctx, **kwargs)
        # no rank tears its group down while a peer still talks to it (gloo aborts the process
        # on exit when it does); on an error there is no barrier: a peer may never reach it
        ctx.barrier()
        return out
    finally:
        destroy(ctx)
