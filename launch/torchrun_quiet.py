"""torchrun as `mlcd --nproc N` runs it: torch.distributed.run unchanged, except that

- a failed worker ends the launcher with one line (which rank, its exit code) instead of the
  elastic agent's own traceback: the worker has already printed its error (one line for bad
  inputs or config);
- `launch()` forwards SIGTERM/SIGINT/SIGHUP sent to `mlcd` to the agent, which stops its workers
  (they run in their own sessions: a signal to mlcd's process group alone would not reach them,
  and SIGKILL to the agent leaves them running; see README "Stopping a run").

    python -m launch.torchrun_quiet --nproc_per_node=2 --standalone -m training.train ...
"""
from __future__ import annotations

import signal
import subprocess
import sys


def launch(cmd: list[str], env: dict) -> int:
    """Runs a `torchrun_cmd` command through this module; returns the agent's exit code."""
    i = cmd.index("torch.distributed.run")
    proc = subprocess.Popen([*cmd[:i], "launch.torchrun_quiet", *cmd[i + 1:]], env=env)

    def forward(sig, _frame):
        proc.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    try:
        torchrun(argv)
    except SignalException as e:  # the agent has stopped its workers
        print(f"mlcd: stopped by signal {int(e.sigval)}; workers terminated", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        code = first.exitcode if first.exitcode and first.exitcode > 0 else 1
        print(f"mlcd: {e.name} failed on rank {rank} (exit code {first.exitcode}); its error is "
              f"printed above", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
