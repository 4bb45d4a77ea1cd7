"""The guards every stage run enters once, before any work: the run's network/shell policy
(pipeline/netpolicy.py) and the lock on its output folder (pipeline/lock.py).

    with stage_guard(run, cfg.out_dir, ctx, "cluster"):
        run_kmeans(run, cfg, ctx)

Collective (rank 0 takes the lock, every rank gets the same refusal). ``out_dir=None`` applies
the policy only (a stage that writes no folder of its own).

A worker started by torchrun also asks Linux to send it SIGTERM when its agent dies: torchrun
starts each worker in its own session, so a SIGKILL to the agent (or to the launching shell's
process group) would otherwise leave the workers running, still writing into the folder.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from pipeline import lock, netpolicy


@contextmanager
def stage_guard(run, out_dir: str | os.PathLike | None, ctx, what: str = "") -> Iterator[None]:
    netpolicy.apply(run)
    _die_with_agent()
    if out_dir is None:
        yield
        return
    with lock.hold(out_dir, ctx, what):
        yield


def _die_with_agent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) under torchrun (Linux); one syscall."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
