"""`mlcd status RUN_DIR`: where a run stands, from its files alone (no process group, no torch).

    mlcd status runs/demo            # one line per stage folder found under RUN_DIR
    mlcd status runs/demo --json     # the same as JSON

For every stage folder (one holding a ``config.<stage>.yaml``, at most three levels down) it
reads the small files the stages write, never the data parts:
- ``status.<stage>.json`` (pipeline/core/tracking.py StageStatus): done, failed with its one error
  line, or running; "running" whose pid is gone on this host is reported as stopped (killed);
- ``.mlcd.lock`` (pipeline/core/lock.py): the owner of a running stage;
- ``.progress/<desc>.rank<r>.json`` (pipeline/core/tracking.py Progress): done/total summed over
  ranks, rate and ETA, and how old the newest record is;
- training: ``metrics.jsonl``'s last record (step, loss, samples/s) against ``train.steps``, and
  the ETA from the step rate between its last two records.
Cost: a handful of small reads per stage, whatever the size of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from pipeline.core.lock import LOCK_NAME
from pipeline.core.tracking import PROGRESS_DIR, fmt_duration, read_progress


def stage_dirs(root: Path, depth: int = 3) -> list[tuple[str, Path]]:
    """(stage, folder) for every ``config.<stage>.yaml`` or ``status.<stage>.json`` under root
    (breadth-first, sorted)."""
    found, level = [], [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            try:
                entries = sorted(d.iterdir())
            except OSError:
                continue
            for p in entries:
                if p.is_dir():
                    if not p.name.startswith(".") and p.name not in ("wandb", "checkpoints"):
                        nxt.append(p)
                    continue
                for pre, suf in (("config.", ".yaml"), ("status.", ".json")):
                    if p.name.startswith(pre) and p.name.endswith(suf) and (p.name[len(pre):-len(suf)], d) not in found:
                        found.append((p.name[len(pre):-len(suf)], d))
        level = nxt
    return found


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(info: dict) -> bool | None:
    """Is the recorded pid alive? None when it ran on another host (we can't see it)."""
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_of(folder: Path) -> dict | None:
    """Summed progress over ranks of the newest reporter in folder/.progress (or its subfolders')."""
    files = sorted(folder.glob(f"{PROGRESS_DIR}/*.json")) + sorted(folder.glob(f"*/{PROGRESS_DIR}/*.json"))
    recs = [(f.name.split(".rank")[0], r) for f in files if (r := read_progress(f))]
    if not recs:
        return None
    newest = max(recs, key=lambda x: x[1].get("time", 0))[0]
    mine = [r for d, r in recs if d == newest]
    if any(r.get("replicated") for r in mine):  # every rank ran the same steps: one rank's count
        mine = mine[:1]
    done = sum(r["done"] for r in mine)
    totals = [r.get("total") for r in mine]
    total = sum(totals) if None not in totals else None
    el = max(r.get("elapsed_s", 0) for r in mine)
    rate = (done - sum(r.get("initial", 0) for r in mine)) / el if el > 0 else 0.0
    out = {"what": newest, "done": done, "total": total, "unit": mine[0].get("unit", ""),
           "rate": rate, "age_s": time.time() - max(r.get("time", 0) for r in mine),
           "final": all(r.get("final") for r in mine), "ranks": len(mine),
           "counters": mine[0].get("counters", {})}
    if total and rate > 0 and not out["final"]:
        out["eta_s"] = max(total - done, 0) / rate
    return out


def train_of(folder: Path) -> dict | None:
    """Step, planned steps, last metrics and ETA of a training folder."""
    try:
        cfg = yaml.safe_load((folder / "config.train.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    steps = (cfg.get("train") or {}).get("steps")
    lines = []
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))  # the tail is enough, however long the run
            lines = [ln for ln in f.read().decode(errors="replace").splitlines()[1:] if ln.strip()]
    except OSError:
        pass
    recs = []
    for ln in lines[-2:]:
        try:
            recs.append(json.loads(ln))
        except ValueError:  # a torn last line of a killed run
            continue
    out: dict = {"steps": steps}
    if recs:
        last = recs[-1]
        out.update(step=last.get("step"), loss=last.get("loss", last.get("train/loss")),
                   samples_per_s=last.get("samples_per_s", last.get("train/samples_per_s")))
        if len(recs) == 2 and steps and "elapsed_s" in last and "elapsed_s" in recs[0]:
            dstep = last["step"] - recs[0]["step"]
            dt = last["elapsed_s"] - recs[0]["elapsed_s"]
            if dstep > 0 and dt > 0:
                out["eta_s"] = (steps - last["step"]) * dt / dstep
    return out


def describe(stage: str, folder: Path) -> dict:
    st = _json(folder / f"status.{stage}.json") or {}
    lock = _json(folder / LOCK_NAME)
    row: dict = {"stage": stage, "folder": str(folder), "state": st.get("state", "unknown")}
    if lock:  # a run holds (or held, when killed) the folder
        alive = _alive(lock)
        if alive is False:
            row["state"] = "stopped"
            row["detail"] = f"pid {lock.get('pid')} is gone (killed?); rerun the same command to resume"
        else:
            row["state"] = "running"
            row["owner"] = f"pid {lock.get('pid')} on {lock.get('host')}"
            row["running_for_s"] = time.time() - (lock.get("start") or time.time())
    elif st.get("state") == "failed":
        row["detail"] = st.get("error")
        row["exit_code"] = st.get("exit_code")
    elif not st:
        row["detail"] = "no status file: never finished here (or written before status files existed)"
    prog = progress_of(folder)
    if prog:
        row["progress"] = prog
    if stage == "train":
        row["train"] = train_of(folder)
    return row


def fmt_row(r: dict) -> str:
    parts = [f"{r['stage']:<14s} {r['state']:<8s}"]
    p = r.get("progress")
    t = r.get("train")
    if t and t.get("step") is not None:
        parts.append(f"step {t['step']}/{t.get('steps')}" + (f" loss {t['loss']:.4f}" if t.get("loss") is not None else "")
                     + (f" {t['samples_per_s']:.1f} samples/s" if t.get("samples_per_s") else ""))
        if r["state"] == "running" and "eta_s" in t:
            parts.append(f"ETA {fmt_duration(t['eta_s'])}")
    elif p and r["state"] != "done":
        tot = f"/{p['total']:,.0f}" if p.get("total") else ""
        pct = f" ({100 * p['done'] / p['total']:.1f}%)" if p.get("total") else ""
        parts.append(f"{p['what']} {p['done']:,.0f}{tot} {p['unit']}{pct}, {p['rate']:,.1f} {p['unit']}/s, "
                     f"updated {fmt_duration(p['age_s'])} ago")
        if r["state"] == "running" and "eta_s" in p:
            parts.append(f"ETA {fmt_duration(p['eta_s'])}")
    if r.get("owner"):
        parts.append(f"({r['owner']}, for {fmt_duration(r['running_for_s'])})")
    if r.get("detail"):
        parts.append(f"- {r['detail']}")
    return "  ".join(parts) + f"  [{r['folder']}]"


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd status", description="Where a run stands, from its files alone.")
    ap.add_argument("run_dir", help="a run folder (run.out_dir) or any stage folder in it")
    ap.add_argument("--json", action="store_true", help="print JSON instead of one line per stage")
    args = ap.parse_args(argv)
    root = Path(args.run_dir)
    if not root.is_dir():
        print(f"mlcd status: {root}: no such folder", file=sys.stderr)
        return 1
    rows = [describe(stage, folder) for stage, folder in stage_dirs(root)]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    elif not rows:
        print(f"{root}: no stage has written here yet (no config.<stage>.yaml found)")
    else:
        print("\n".join(fmt_row(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
