"""The guards every stage run enters once, before any work: the run's network/shell policy
(pipeline/core/netpolicy.py), its cap on one tar member (``run.max_member_bytes``, read by
pipeline/core/shards.py's reader) and the lock on its output folder (pipeline/core/lock.py, which also
removes temp files a killed run left there).

    with stage_guard(run, cfg.out_dir, ctx, "cluster"):
        run_kmeans(run, cfg, ctx)

Collective (rank 0 takes the lock, every rank gets the same refusal). ``out_dir=None`` applies
the policy only (a stage that writes no folder of its own).

A worker started by torchrun also asks Linux to send it SIGTERM when its agent dies: torchrun
starts each worker in its own session, so a SIGKILL to the agent (or to the launching shell's
process group) would otherwise leave the workers running, still writing into the folder.
DataLoader workers do the same for their parent process (``die_with_parent_fn``): a worker blocked
handing a batch to a killed parent would otherwise live on (torch's own check needs an idle worker).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

from pipeline.core import fs, lock, netpolicy, shards


@contextmanager
def stage_guard(run, out_dir: str | os.PathLike | None, ctx, what: str = "") -> Iterator[None]:
    netpolicy.apply(run)
    shards.set_member_cap(getattr(run, "max_member_bytes", shards.MAX_MEMBER_BYTES))
    _die_with_agent()
    if out_dir is None:
        yield
        return
    if fs.is_remote(out_dir):  # object stores have no lock: one writer per prefix is the rule
        ctx.agree(lambda: fs.check(out_dir, f"{what} output folder", write=True))
        yield
        return
    with lock.hold(out_dir, ctx, what):
        yield


def _die_with_agent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) under torchrun (Linux); one syscall."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if _pdeathsig(signal.SIGTERM) and os.getppid() == 1:  # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _pdeathsig(sig: int) -> bool:
    """Asks Linux to send ``sig`` to this process when its parent dies; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def die_with_parent_fn() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn``: the worker is killed when the process that built the
    loader dies (SIGKILL: a worker holds nothing to save). Linux: PR_SET_PDEATHSIG, then a ppid
    check for a parent gone before it took effect; elsewhere a thread polls the ppid each second."""
    return partial(_die_with_parent, os.getpid())


def _die_with_parent(parent: int, worker_id: int = 0) -> None:
    if _pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
