"""Run tracking: wandb on rank 0 only (disabled by default, offline for the demo, online when the
user sets run.wandb.mode=online), plus a progress bar with throughput. One place for both."""
from __future__ import annotations

import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import WandbConfig
from pipeline.dist import DistContext
from pipeline.io import atomic_write_text

log = logging.getLogger("mlcd")


class Tracker:
    """``log(dict, step)`` goes to wandb (rank 0, if enabled); nothing is kept in memory (stages
    write their own metrics files)."""

    def __init__(self, cfg: WandbConfig, ctx: DistContext, out_dir: str, job: str, config: dict):
        self.run = None
        if ctx.is_main and cfg.mode != "disabled":
            import wandb
            # pass mode= explicitly: flipping WANDB_MODE after a first init has no effect
            # one wandb run per job folder, across requeues: its id lives in the folder
            mode: Any = cfg.mode  # checked in WandbConfig; wandb types it as a Literal
            self.run = wandb.init(mode=mode, project=cfg.project, entity=cfg.entity,
                                  name=cfg.name or job, job_type=job, dir=out_dir, config=config,
                                  group=cfg.group, tags=list(cfg.tags) or None,
                                  id=wandb_run_id(out_dir, job), resume="allow", reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Table(columns=list[str | int](columns), data=rows)})

    def log_image(self, key: str, path: str) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(path)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_run_id(out_dir: str, job: str) -> str:
    """The job's wandb run id, created once and kept in `{out_dir}/wandb_id.{job}.txt`: a resumed
    or requeued job logs into the same wandb run (wandb.init(id=..., resume="allow"))."""
    path = Path(out_dir) / f"wandb_id.{job}.txt"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # wandb ids: [a-z0-9], unique per project
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


def progress(total: int | None, desc: str, ctx: DistContext, unit: str = "img", initial: int = 0):
    """A tqdm bar per rank (position = rank) showing throughput; off when not a terminal."""
    return tqdm(total=total, desc=f"[rank {ctx.rank}] {desc}" if ctx.world_size > 1 else desc,
                unit=unit, position=ctx.rank if ctx.world_size > 1 else None, initial=initial,
                file=sys.stderr, dynamic_ncols=True, disable=None, mininterval=2.0)


def setup_logging(ctx: DistContext | None = None) -> None:
    rank = f"[rank {ctx.rank}] " if ctx is not None and ctx.world_size > 1 else ""
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s {rank}%(name)s %(levelname)s %(message)s")


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
