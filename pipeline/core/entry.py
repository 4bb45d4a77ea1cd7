"""The one entry path of every stage: ``python -m <stage>`` / ``mlcd <stage>`` -> ``stage_cli(name)``
-> the module's ``main(config, overrides, instance)`` = ``stage_main(name, fn, ...)`` -> ``load_config``
-> ``run_distributed(fn, run, cfg)`` -> ``fn(run, cfg, ctx)``. The stage's section, schema and
whether it runs on ranks come from the stage table (pipeline/core/stages.py).

- ``stage_cli`` parses ``--config FILE [--instance NAME] key=value ...`` (``stage_args``) and
  turns user errors into one line on stderr and an exit code: 2 for a bad config (``ConfigError``,
  or a ``StageError`` whose ``exit_code`` is 2), 1 for bad input (a ``StageError``: an unreadable
  store, failed shards, a refused weights file, ...; and a full disk, however the writer reports
  it: ``DiskFull``).
  Every rank prints and exits the same way, so under torchrun no rank is left waiting and the
  launcher only sees non-zero exits (``launch/cli.py`` reports those without a traceback).
- ``run_distributed`` builds the ``DistContext`` once, sets up per-rank logging, runs the stage
  and always destroys the process group, also on errors.

Per-stage setup that every stage needs goes in ``run_distributed``, before ``fn`` runs: it is
the single place all stages pass through with a context in hand. Today: the network/shell policy
and the output-folder lock (``pipeline/core/guard.py``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core.config import ConfigError, RunConfig, load_config
from pipeline.core.dist import DistContext, destroy, init_distributed
from pipeline.core.errors import InputError, StageError, disk_full  # noqa: F401 -- re-exported: the stages' error base
from pipeline.core.guard import stage_guard
from pipeline.core.tracking import StageStatus, setup_logging


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
    """``--config FILE [key=value ...]`` for an entry outside the stage table (the standalone
    cluster report, clustering/report.py); stages use ``stage_cli``. User errors exit 1/2."""
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


def stage_main(name: str, fn: Callable[..., Any], config: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), instance: str | None = None, *,
               setup: Callable[[], None] | None = None) -> Any:
    """The body of every stage module's ``main(config, overrides, instance)``: loads ``run`` and
    the stage's section (layered with ``<section>@<instance>:`` when an instance is named), runs
    ``setup()``, then ``fn(run, cfg, ctx)`` on every rank under ``run_distributed`` (the output
    folder ``cfg.out_dir`` locked), or ``fn(run, cfg)`` in this process for a one-process stage."""
    from pipeline.core.stages import STAGES, schema
    stage = STAGES[name]
    assert stage.section, f"stage {name} has no config section"
    named = {"instance": instance} if instance else {}  # a plain run calls load_config as before
    run, cfg = load_config(config, list(overrides), stage.section, schema(stage.section), **named)
    if setup is not None:
        setup()
    if not stage.torchrun:
        return fn(run, cfg)
    return run_distributed(fn, run, cfg, lock_dir=cfg.out_dir)


def _flag_error(prog: str, argv: list[str], flag: str, section: str) -> str:
    """One line for an unknown ``--flag``: the keys it may mean (``--steps 10`` -> train.steps=10)."""
    from pipeline.core.keys import suggest
    from pipeline.core.stages import schema
    value = flag.split("=", 1)[1] if "=" in flag else None
    i = argv.index(flag)
    if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
        value = argv[i + 1]
    hits = suggest(flag, value, {"run": RunConfig, section: schema(section)})
    hint = f"did you mean {' or '.join(hits)}?" if hits else f"settings are key=value ({prog} --help lists them)"
    return f"{prog}: unknown option {flag.split('=', 1)[0]}; {hint}"


def stage_args(name: str, argv: Sequence[str], prog: str | None = None,
               epilog: str = "") -> argparse.Namespace:
    """``[--config FILE] [--instance NAME] [key=value ...]`` of a config stage -> config,
    instance, overrides. ``--help`` lists the section's keys (type, default, doc) and exits 0;
    an unknown ``--flag`` exits 2 with one line naming the key it may mean."""
    from pipeline.core.keys import describe
    from pipeline.core.stages import STAGES, schema
    stage = STAGES[name]
    prog = prog or f"mlcd {name}"
    # DeepSpeed's launcher appends --local_rank=N (it also sets LOCAL_RANK, which the stages read)
    args = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    section = stage.section or ""
    if {"-h", "--help"} & set(args):  # only then: the keys cost reading the schemas' source
        keys = describe(schema(section), section) + "\n" + describe(RunConfig, "run")
        epilog = (f"{epilog}\n\n" if epilog else "") + (
            f"settings (key=value; a run file's `{section}@NAME:` layers over `{section}:`):\n{keys}")
    parser = argparse.ArgumentParser(prog=prog, description=stage.help, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=None, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--instance", default=None,
                        help=f"named instance: the run file's `{section}@NAME:` over `{section}:`")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {section}.out_dir=DIR")
    parsed, unknown = parser.parse_known_args(args)
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        print(_flag_error(prog, args, flags[0], section), file=sys.stderr)
        sys.exit(2)
    parsed.overrides += unknown
    return parsed


def stage_cli(name: str, argv: Sequence[str] | None = None, prog: str | None = None,
              epilog: str = "") -> Any:
    """``python -m <module>`` and ``mlcd <name>`` of a config stage (arguments: ``stage_args``):
    the module's ``main(config, overrides[, instance])``. User errors exit 1/2 with one line
    (``SystemExit``); returns the stage's result."""
    from pipeline.core.stages import STAGES
    args = stage_args(name, sys.argv[1:] if argv is None else argv, prog, epilog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub lookups unless run.allow_download
    module = importlib.import_module(STAGES[name].module)
    named = {"instance": args.instance} if args.instance else {}
    try:
        return module.main(args.config, args.overrides, **named)
    except (ConfigError, StageError) as e:
        sys.exit(report(e))


def run_distributed(fn: Callable[..., Any], run, cfg, *, lock_dir=None, **kwargs) -> Any:
    """Builds the context once, logs per rank, runs ``fn(run, cfg, ctx)`` and always tears the
    process group down (also on errors). The stage runs under ``pipeline.core.guard.stage_guard``:
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
