"""The guards every stage run enters once, before any work: the run's network/shell policy
(pipeline/netpolicy.py) and the lock on its output folder (pipeline/lock.py).

    with stage_guard(run, cfg.out_dir, ctx, "cluster"):
        run_kmeans(run, cfg, ctx)

Collective (rank 0 takes the lock, every rank gets the same refusal). ``out_dir=None`` applies
the policy only (a stage that writes no folder of its own).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from pipeline import lock, netpolicy


@contextmanager
def stage_guard(run, out_dir: str | os.PathLike | None, ctx, what: str = "") -> Iterator[None]:
    netpolicy.apply(run)
    if out_dir is None:
        yield
        return
    with lock.hold(out_dir, ctx, what):
        yield
