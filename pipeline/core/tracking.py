"""Run tracking: wandb on rank 0 only (disabled by default, offline for the demo, online when the
user sets run.wandb.mode=online), plus the one progress reporter every stage uses (a tqdm bar on a
terminal, periodic log lines with rate and ETA in batch logs). One place for both."""
from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.config import RunConfig, WandbConfig
from pipeline.core.dist import DistContext
from pipeline.core.errors import InputError
from pipeline.core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mlcd")


class Tracker:
    """``log(dict, step)`` goes to wandb (rank 0, if enabled); nothing is kept in memory (stages
    write their own metrics files). One wandb group per pipeline run (``run.name``), the stage as
    job_type, run names ``<run.name>-<stage>``; see ``wandb_settings`` for the environment."""

    def __init__(self, run: RunConfig | WandbConfig, ctx: DistContext, out_dir: str, job: str, config: dict):
        self.run = None
        cfg = run.wandb if isinstance(run, RunConfig) else run
        s = wandb_settings(cfg, run_name(run) if isinstance(run, RunConfig) else None, job, out_dir)
        if ctx.is_main and s["mode"] != "disabled":
            import wandb
            # pass mode= explicitly: flipping WANDB_MODE after a first init has no effect
            # one wandb run per job folder, across requeues: its id lives in the folder
            self.run = wandb.init(**s, job_type=job, config=config, tags=list(cfg.tags) or None,
                                  id=wandb_run_id(out_dir, job), resume="allow", reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Table(columns=list[str | int](columns), data=rows)})

    def log_image(self, key: str, path: str, caption: str | None = None) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(path, caption=caption)})

    def log_histogram(self, key: str, values_or_counts, edges=None) -> None:
        """A wandb histogram of raw values, or of precomputed (counts, edges) when edges are given."""
        if self.run is not None:
            import wandb
            h = (wandb.Histogram(np_histogram=(values_or_counts, edges)) if edges is not None
                 else wandb.Histogram(values_or_counts, num_bins=64))
            self.run.log({key: h})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def run_name(run: RunConfig) -> str:
    """``run.name``, else the run folder's name (``runs/demo`` -> ``demo``)."""
    return run.name or Path(run.out_dir).resolve().name


def wandb_settings(cfg: WandbConfig, name: str | None, job: str, out_dir: str) -> dict:
    """wandb.init's mode/project/entity/name/group/dir: the config's value when set, else wandb's
    standard variable (WANDB_MODE/PROJECT/ENTITY/DIR, as its users expect), else our default."""
    env = os.environ
    mode = cfg.mode or env.get("WANDB_MODE") or "disabled"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older spellings
    base = cfg.name or name
    return {"mode": mode, "project": cfg.project or env.get("WANDB_PROJECT") or "openmlcd",
            "entity": cfg.entity or env.get("WANDB_ENTITY"), "name": f"{base}-{job}" if base else job,
            "group": cfg.group or name, "dir": env.get("WANDB_DIR") or out_dir}


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


_EVERY_S = 60.0  # the non-interactive progress interval: run.log_every_s (setup_logging sets it)
PROGRESS_DIR = ".progress"  # {out_dir}/.progress/{desc}.rank{r}.json: counts per rank, for rank 0 and `mlcd status`


class Progress:
    """One progress reporter for every stage. On a terminal: a tqdm bar per rank. Otherwise (SLURM,
    nohup, CI logs, where tqdm is silent): rank 0 logs one line every `run.log_every_s` seconds with
    done/total, rate, ETA and the stage's own counters (``set(skipped=..., parts=...)``).

    Multi-rank without a collective per item: with ``share_dir`` every rank writes its counts to
    ``{share_dir}/.progress/{desc}.rank{r}.json`` at most once per interval (one small atomic
    write), and rank 0's line sums the newest file of each rank; without it rank 0 scales its own
    share by the world size (said in the line). The files also let `mlcd status` show a running or
    killed stage's progress. Cost: one time check per update, one file write per interval."""

    def __init__(self, total: int | None, desc: str, ctx: DistContext, unit: str = "img", initial: int = 0,
                 share_dir: str | Path | None = None, every_s: float | None = None, replicated: bool = False,
                 deadline_s: float = 0.0):
        self.total, self.desc, self.ctx, self.unit = total, desc, ctx, unit
        self.deadline_s = deadline_s  # > 0: the stage stops this many seconds in (a time budget)
        self.replicated = replicated  # every rank does the same steps (training, k-means): no sum
        self.done, self.initial = initial, initial
        self.counters: dict[str, Any] = {}
        self.every_s = _EVERY_S if every_s is None else every_s
        from pipeline.core import fs
        if share_dir is not None and fs.is_remote(share_dir):
            share_dir = None  # a URL: no per-rank files (a PUT per rank per interval, listed by nobody)
        self.dir = Path(share_dir) / PROGRESS_DIR if share_dir is not None else None
        self.t0 = self.t_last = time.perf_counter()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=f"[rank {ctx.rank}] {desc}" if ctx.world_size > 1 else desc,
                        unit=unit, position=ctx.rank if ctx.world_size > 1 else None, initial=initial,
                        file=sys.stderr, dynamic_ncols=True, mininterval=2.0) if tty else None
        self._share()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.perf_counter()
        if now - self.t_last >= self.every_s:
            self.t_last = now
            self._share()
            if self.bar is None and self.ctx.is_main:
                log.info("%s", self.line())

    def set(self, **counters: Any) -> None:
        """The stage's own counters (skipped samples, parts done, k-means objective, ...)."""
        self.counters.update(counters)
        if self.bar is not None:
            self.bar.set_postfix(counters, refresh=False)

    def _share(self, final: bool = False) -> None:
        if self.dir is None:
            return
        try:
            atomic_write_json(self.dir / f"{self.desc}.rank{self.ctx.rank}.json", {
                "done": self.done, "total": self.total, "unit": self.unit, "initial": self.initial,
                "elapsed_s": round(time.perf_counter() - self.t0, 3), "time": time.time(), "final": final,
                "world_size": self.ctx.world_size, "counters": self.counters, "replicated": self.replicated})
        except OSError as e:  # progress is advice: never stop a stage for it
            log.debug("progress file not written: %s", e)

    def _global(self) -> tuple[float, float | None, str]:
        """(done, total, note) over all ranks: the ranks' files, else rank 0's share x world size."""
        w = self.ctx.world_size
        if w == 1 or self.replicated:
            return self.done, self.total, ""
        if self.dir is not None:
            seen = [read_progress(self.dir / f"{self.desc}.rank{r}.json") for r in range(w)]
            got = [s for s in seen if s]
            if len(got) == w:
                totals = [s["total"] for s in got]
                return (sum(s["done"] for s in got), sum(totals) if None not in totals else None, "")
        total = self.total * w if self.total is not None else None
        return self.done * w, total, f" (rank 0 x {w}, estimated)"

    def line(self, final: bool = False) -> str:
        done, total, note = self._global()
        el = time.perf_counter() - self.t0
        rate = (done - self.initial * (1 if self.replicated else self.ctx.world_size)) / el if el > 0 else 0.0
        head = f"{self.desc}: {done:,.0f}" + (f"/{total:,.0f} {self.unit}" if total else f" {self.unit}")
        if total:
            head += f" ({100 * done / total:.1f}%)"
        head += f" {rate:,.1f} {self.unit}/s"
        if final:
            head = f"{self.desc}: done {done:,.0f} {self.unit} in {fmt_duration(el)} ({rate:,.1f} {self.unit}/s)"
        elif total and rate > 0:
            head += f" ETA {fmt_duration(budgeted_eta(max(total - done, 0) / rate, self.deadline_s, el))}"
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in self.counters.items())
        return head + note + (f" | {extra}" if extra else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self._share(final=True)
            return
        self._share(final=True)
        if self.ctx.is_main and time.perf_counter() - self.t0 >= min(self.every_s, 5.0):
            log.info("%s", self.line(final=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_progress(path: Path) -> dict | None:
    try:
        from pipeline.core import fs
        return json.loads(fs.read_bytes(path))
    except (OSError, ValueError, InputError):
        return None


def budgeted_eta(eta_s: float, budget_s: float, elapsed_s: float) -> float:
    """An ETA that does not pass a time budget (> 0): a budgeted stage stops there when that comes
    first (the progress line and the training log both say so)."""
    return min(eta_s, max(budget_s - elapsed_s, 0.0)) if budget_s > 0 else eta_s


def fmt_duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def progress(total: int | None, desc: str, ctx: DistContext, unit: str = "img", initial: int = 0,
             share_dir: str | Path | None = None, replicated: bool = False, deadline_s: float = 0.0) -> Progress:
    """The stage's progress reporter (see Progress); replicated: every rank runs the same steps;
    deadline_s: a time budget the ETA does not pass."""
    return Progress(total, desc, ctx, unit=unit, initial=initial, share_dir=share_dir, replicated=replicated,
                    deadline_s=deadline_s)


def setup_logging(ctx: DistContext | None = None, log_every_s: float | None = None) -> None:
    """Per-rank log format; ``log_every_s`` (run.log_every_s) sets the progress line interval."""
    global _EVERY_S
    if log_every_s is not None:
        _EVERY_S = float(log_every_s)
    rank = f"[rank {ctx.rank}] " if ctx is not None and ctx.world_size > 1 else ""
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s {rank}%(name)s %(levelname)s %(message)s")


class StageStatus:
    """``{out_dir}/status.{stage}.json`` (rank 0) when a stage run ends: done, or failed with its
    one error line and exit code, so `mlcd status` can tell a stage's state from the files alone
    (a running or killed one it tells from the folder's lock, pipeline/core/lock.py). A run that
    fails before writing anything leaves nothing (the lock removes the folder it made). Entered
    by pipeline/core/entry.py's run_distributed inside the folder's lock."""

    def __init__(self, out_dir: str | Path | None, module: str, ctx: DistContext):
        from pipeline.core.stages import name_of_module
        if module == "__main__":  # `python -m pipeline.embed`: the module's real name
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            module = spec.name if spec is not None else module
        self.path = None
        if out_dir is not None and ctx.is_main:
            self.path = Path(out_dir) / f"status.{name_of_module(module)}.json"
        self.info: dict[str, Any] = {}

    def _write(self, **info: Any) -> None:
        if self.path is None:
            return
        self.info.update(info)
        try:
            atomic_write_json(self.path, self.info)
        except OSError as e:  # the status is advice: never fail a stage for it
            log.debug("status not written: %s", e)

    def __enter__(self) -> "StageStatus":
        import os
        import socket
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        return self

    def __exit__(self, typ, e, tb) -> None:
        if e is None:
            self._write(state="done", ended=time.time(), error=None, exit_code=None)
            return
        from pipeline.core import fs
        from pipeline.core.lock import LOCK_NAME
        if self.path is None or not any(n != LOCK_NAME for n in fs.ls(self.path.parent)):
            return  # nothing written here (bad input or config caught up front): leave nothing
        code = getattr(e, "exit_code", 2 if type(e).__name__ == "ConfigError" else None)
        if code in (1, 2) and (read_progress(self.path) or {}).get("state") == "done":
            return  # a rerun refused on its input or config changed nothing: the folder stays done
        line = (str(e).strip().splitlines() or [""])[-1][:500]
        self._write(state="failed", ended=time.time(), error=f"{type(e).__name__}: {line}", exit_code=code)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
