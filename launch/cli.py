"""`mlcd`: one command for humans over the stage programs (each also runs as `python -m ...`).

    mlcd data demo [--config F] [k=v ...]     build the offline demo shards
    mlcd data rice [--config F] [k=v ...]     build the RICE demo scenes (objects + words, boxes)
    mlcd embed|cluster|assign|train|eval [--nproc N] [--nnodes N] [--config F] [k=v ...]
    mlcd export CHECKPOINT OUT_DIR [...]
    mlcd demo [k=v ...]                         the whole pipeline on the demo data
    mlcd ablate [--quick] [--config F] [k=v ...]  MLCD's ablation grid (launch/ablate.py)
    mlcd check --config F [k=v ...]             validate every section of a run config
    mlcd status RUN_DIR [--json]                where a run stands (every stage), from its files

With --nproc/--nnodes > 1 the stage is started under torchrun (c10d rendezvous); otherwise it
runs in this process.
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys

from pipeline.stages import STAGES as REGISTRY

# `mlcd <command>` -> module, from the one stage table (pipeline/stages.py); `mlcd data demo`
# builds the demo shards (the registry's `data` stage).
STAGES = {name: s.module for name, s in REGISTRY.items() if name not in ("data", "data-rice", "envcheck")}
DATA = {"demo": REGISTRY["data"].module, "rice": REGISTRY["data-rice"].module}


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
    exit 1/2 (pipeline/entry.py); the agent's failure report and traceback are replaced by the
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


def _pop_int(args: list[str], flag: str, default: int) -> int:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            v = args[i + 1]
            del args[i:i + 2]
            return int(v)
        if a.startswith(flag + "="):
            del args[i]
            return int(a.split("=", 1)[1])
    return default


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    sub, rest = args[0], args[1:]
    if sub == "data":
        if not rest or rest[0] not in DATA:
            print(f"usage: mlcd data {{{','.join(DATA)}}} [--config F] [k=v ...]", file=sys.stderr)
            return 2
        module, rest = DATA[rest[0]], rest[1:]
    elif sub in STAGES:
        module = STAGES[sub]
    else:
        print(f"mlcd: unknown command {sub!r}; one of: data, {', '.join(STAGES)}", file=sys.stderr)
        return 2
    nproc = _pop_int(rest, "--nproc", 1)
    nnodes = _pop_int(rest, "--nnodes", 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if nproc > 1 or nnodes > 1:
        cmd = torchrun_cmd(module, rest, nproc, nnodes)
        print("+", shlex.join(cmd), file=sys.stderr)
        return run_torchrun(cmd[3:])
    # Every stage module exposes cli(argv) (config stages: pipeline.entry.cli_main(main, argv)).
    res = importlib.import_module(module).cli(rest)
    return res if isinstance(res, int) else 0


if __name__ == "__main__":
    sys.exit(main())
