"""`mlcd`: one command for humans over the stages of the stage table (pipeline/core/stages.py); each
also runs as `python -m <module>`. `mlcd --help` is generated from the table; `mlcd STAGE --help`
lists the stage's settings (pipeline/core/entry.py:stage_cli).

A stage that runs on ranks starts under torchrun (c10d rendezvous) with --nproc/--nnodes > 1;
otherwise it runs in this process. `mlcd STAGE@NAME` runs the stage with the run file's named
instance section `<section>@NAME:` layered over `<section>:`.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
from pathlib import Path

from pipeline.core.stages import STAGES, Stage

ROOT = Path(__file__).resolve().parents[1]
# Older two-word spellings of the data stages (the Makefile and the demos use them).
ALIASES = {("data", "demo"): "data", ("data", "rice"): "data-rice", ("data", "shards"): "data-shards"}


class UsageError(Exception):
    """A bad `mlcd` command line: one line on stderr, exit code 2."""


def torchrun_cmd(module: str, args: list[str], nproc: int, nnodes: int = 1,
                 rdzv_endpoint: str | None = None, max_restarts: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--nnodes={nnodes}", f"--max_restarts={max_restarts}"]
    if nnodes > 1:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint or os.environ.get('MASTER_ADDR', 'localhost') + ':29500'}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module, *args]


def torchrun_env(**defaults: str) -> dict:
    """The environment for a torchrun child: the caller's, plus defaults it doesn't set. Restarted
    workers must not reuse the agent's rendezvous store (torch 2.14: stale peer addresses ->
    "Gloo connectFullMesh ... Connection refused"; pytorch#135712)."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **defaults, **os.environ}


def mlcd_child(args: list[str], nproc: int = 1) -> tuple[list[str], dict]:
    """(command, environment) of one `mlcd` command as a child process, as the demo and ablation
    runners chain stages: training under torchrun with `nproc` ranks, one OMP thread per process
    (ranks share the cores), hub offline, DeepSpeed's CPU accelerator without a GPU; the caller's
    environment wins."""
    cmd = [sys.executable, "-m", "launch.cli", *args] + ([f"--nproc={nproc}"] if nproc > 1 else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": root, **os.environ}
    if "DS_ACCELERATOR" not in env:
        import torch
        env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cmd, env


def run_torchrun(torchrun_args: list[str]) -> int:
    """torchrun in this process, so a stage's user error stays one line: the ranks print it and
    exit 1/2 (pipeline/core/entry.py); the agent's failure report and traceback are replaced by the
    exit code, or one line naming the rank for anything else (a crash prints its own traceback
    from the worker; a signal is named here)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    for k, v in torchrun_env().items():
        os.environ.setdefault(k, v)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code not in (1, 2):
            print(f"mlcd: {e.name}: rank {rank} " + (f"killed by signal {failure.signal_name()}" if code < 0
                  else f"exited with code {code}"), file=sys.stderr)
        return code if code > 0 else 1
    return 0


def version() -> str:
    """The version of this checkout (pyproject.toml), else of the installed package."""
    text = (ROOT / "pyproject.toml").read_text() if (ROOT / "pyproject.toml").is_file() else ""
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if m:
        return m.group(1)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("openmlcd")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    """`mlcd --help`, generated from the stage table."""
    also = {v: " ".join(k) for k, v in ALIASES.items()}
    width = max(len(n) for n in STAGES) + 2
    rows = [f"  {n + (' *' if s.torchrun else ''):<{width}}  {s.help}"
            + (f" (also `mlcd {also[n]}`)" if n in also else "") for n, s in STAGES.items()]
    return "\n".join([
        f"mlcd {version()}: the OpenMLCD pipeline, one command per stage (pipeline/core/stages.py)",
        "",
        "usage: mlcd COMMAND [--config F] [k=v ...]     (each command's own arguments: mlcd COMMAND --help)",
        "       mlcd STAGE@NAME ...   a named instance: the run file's `<section>@NAME:` over `<section>:`",
        "       mlcd STAGE --nproc N [--nnodes M] ...   * stages: N ranks per node under torchrun",
        "       mlcd --version",
        "",
        "commands:", *rows,
        "",
        "Shell launchers of the same stages: launch/torchrun.sh, launch/slurm/stage.sbatch, `make STAGE`.",
    ])


def _pop_count(args: list[str], flag: str) -> int:
    """Removes ``flag N`` / ``flag=N`` from args; N must be a whole number >= 1 (default 1)."""
    for i, a in enumerate(args):
        if a == flag or a.startswith(flag + "="):
            if a == flag and i + 1 >= len(args):
                raise UsageError(f"{flag} expects a whole number >= 1")
            raw = a.split("=", 1)[1] if "=" in a else args[i + 1]
            del args[i:i + (1 if "=" in a else 2)]
            if not raw.isdigit() or int(raw) < 1:
                raise UsageError(f"{flag} expects a whole number >= 1, got {raw!r}")
            return int(raw)
    return 1


def parse(argv: list[str]) -> tuple[Stage, str | None, list[str]]:
    """``mlcd COMMAND[@NAME] ...`` -> (stage, instance, the stage's own arguments)."""
    head, rest = argv[0], argv[1:]
    if (head, rest[0] if rest else None) in ALIASES:
        head, rest = ALIASES[(head, rest[0])], rest[1:]
    name, _, instance = head.partition("@")
    if name not in STAGES:
        raise UsageError(f"unknown command {head!r}; one of: {', '.join(STAGES)} (mlcd --help)")
    stage = STAGES[name]
    if "@" in head and (not instance or stage.tool or not stage.section):
        raise UsageError(f"{head!r}: STAGE@NAME names an instance of a config stage "
                         f"({', '.join(n for n, s in STAGES.items() if s.section and not s.tool)})")
    return stage, instance or None, rest


def plan(args: list[str]) -> tuple[Stage, list[str], int, int]:
    """``mlcd COMMAND[@NAME] ...`` -> (stage, the stage's own arguments with ``--instance NAME``
    first when named, ranks per node, nodes). Raises UsageError."""
    stage, instance, rest = parse(args)
    nproc = _pop_count(rest, "--nproc") if stage.torchrun else 1
    nnodes = _pop_count(rest, "--nnodes") if stage.torchrun else 1
    return stage, (["--instance", instance] if instance else []) + rest, nproc, nnodes


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"mlcd {version()}")
        return 0
    try:
        stage, rest, nproc, nnodes = plan(args)
    except UsageError as e:
        print(f"mlcd: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (nproc > 1 or nnodes > 1) and not {"-h", "--help"} & set(rest):
        cmd = torchrun_cmd(stage.module, rest, nproc, nnodes)
        print("+", shlex.join(cmd), file=sys.stderr)
        return run_torchrun(cmd[3:])
    if stage.tool:  # parses its own arguments
        return importlib.import_module(stage.module).main(rest)
    from pipeline.core.entry import stage_cli
    more = (f"SLURM: sbatch -J mlcd-{stage.name} {stage.slurm} launch/slurm/stage.sbatch {stage.name} "
            "CONFIG [k=v ...]") if stage.shell else ""
    stage_cli(stage.name, rest, epilog=more)
    return 0


if __name__ == "__main__":
    sys.exit(main())
