"""Stage 2b: every row of the store gets its top-l nearest centers (MLCD's multi-labels, l = 8).

    python -m clustering.assign --config configs/demo.yaml [assign.l=8 ...]
    torchrun --nproc_per_node N -m clustering.assign ...          (ranks split the parts)

Exact by default (``engine=auto``: torch's blocked GEMM + partial top-l or faiss IndexFlatIP,
whichever a quick probe at start measures faster on this machine, see clustering/topk.py). ``engine=hnsw`` is approximate (for
K ~ 1M); its recall@l against exact search is measured on ``recall_rows`` rows and reported.
Rows with NaN/inf/zero norm get labels -1 and sims 0 (counted). Output, per part, through
pipeline.core.store.write_labels (sims, labels, then ``labels_{i}.json``, the part's record: the
digest of its metadata part's keys and the centers' fingerprint, pipeline/core/provenance.py; each
atomic: a part whose record exists and matches is done, so a killed run redoes only unfinished
parts, and a part whose store part changed is labelled again); ``manifest.json`` is written last.
Memory: one part's rows of one block at a time (memory-mapped) + K x D centers + the part's
N x l outputs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clustering.data import open_store
from clustering.report import make_report
from clustering.topk import ENGINES, TopK, recall_at_l
from pipeline.core import fs
from pipeline.core.config import RESUMABLE, RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.io import atomic_write_json, clean_stale_tmp, load_npy, read_json
from pipeline.core.provenance import centroids_fingerprint, keys_digest, label_mismatch, label_record
from pipeline.core.store import (
    KINDS,
    labels_path,
    meta_path,
    part_name,
    read_label_record,
    settle_label_state,
    sims_path,
    write_labels,
)
from pipeline.core.topl import agreed_centroids, file_sha256, label_rows
from pipeline.core.tracking import Timer, Tracker, progress

log = logging.getLogger("mlcd.assign")


@dataclass
class AssignConfig:
    store: str = "${run.out_dir}/store"
    kind: str = "joint"                 # must match the feature kind the centers were trained on
    centroids: str = "${run.out_dir}/clusters/centroids.npy"
    out_dir: str = "${run.out_dir}/clusters/labels"
    l: int = 8                          # labels per row (MLCD: 8; UNICOM: 1)
    engine: str = "auto"                # auto (faster of torch/faiss, measured) | torch | faiss | hnsw (approx.)
    block_rows: int = 16384             # rows per GEMM block: block_rows x K floats of scores
    gpu: bool = True
    skip_incomplete: bool = False       # parts without metadata: error (default) or counted skip
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    recall_rows: int = 2000             # rows on which an approximate engine's recall is measured
    report: bool = field(default=True, metadata=RESUMABLE)  # histogram + contact sheets (rank 0, after labels)
    report_dir: str = field(default="${run.out_dir}/clusters/report", metadata=RESUMABLE)
    report_clusters: int = field(default=12, metadata=RESUMABLE)
    report_members: int = field(default=8, metadata=RESUMABLE)

    def __post_init__(self):
        check(self.kind in KINDS, "kind", self.kind, f"must be one of {KINDS}")
        check(self.engine in ENGINES, "engine", self.engine, f"must be one of {ENGINES}")
        check(self.l >= 1, "l", self.l, "must be >= 1")
        check(self.block_rows >= 1, "block_rows", self.block_rows, "must be >= 1")
        check(self.recall_rows >= 0, "recall_rows", self.recall_rows, "must be >= 0")
        check(self.report_clusters >= 0, "report_clusters", self.report_clusters, "must be >= 0")
        check(self.report_members >= 1, "report_members", self.report_members, "must be >= 1")


AUTO_PROBE_MIN_ROWS = 1_000_000  # engine=auto measures torch vs faiss only on stores this large


def part_done(out: Path, part: int | str, rows: int, l: int, record: dict | None = None) -> bool:
    """Labels and sims present with the right shape and, given the ``record`` this run would
    write, a ``labels_{i}.json`` with the same keys digest and centers (no record: not done, so a
    rerun also refreshes folders written before records were kept)."""
    lp = labels_path(out, part)
    if not (fs.isfile(lp) and fs.isfile(sims_path(out, part))):
        return False
    try:
        if tuple(load_npy(lp, mmap=True).shape) != (rows, l):
            return False
    except (OSError, ValueError):  # unreadable (e.g. truncated by a crash mid-copy): redo it
        return False
    if record is None:
        return True
    rec = read_label_record(out, part)
    return rec is not None and label_mismatch(rec, record["keys_sha256"], record["centroids_fp"]) is None


def part_record(store: Path, part: int, rows: int, centroids_fp: str) -> dict:
    """What label part ``part`` is made from (pipeline/core/provenance.py): its metadata's keys, the centers."""
    return label_record(keys_digest(meta_path(store, part)), rows, centroids_fp)


def run_assign(run: RunConfig, cfg: AssignConfig, ctx: DistContext) -> dict:
    timer = Timer()
    # all input checks before anything is written
    info = ctx.agree(lambda: open_store(cfg.store, cfg.kind, need_metadata=True,
                                        skip_incomplete=cfg.skip_incomplete))
    c = agreed_centroids(ctx, cfg.centroids, info.dim, cfg.l)
    out = ctx.agree(lambda: prepare_out_dir(
        cfg.out_dir, run, {"run": run, "assign": cfg}, "assign"))
    device = ctx.device if (cfg.gpu and torch.cuda.is_available()) else torch.device("cpu")
    topk, engine, state = settle_engine(run, cfg, info.rows, c, out, device, ctx)

    # wandb's run folder goes beside the labels, not among them
    track_dir = Path(cfg.report_dir)
    if ctx.is_main:
        fs.makedirs(track_dir)
    tracker = Tracker(run, ctx, str(track_dir), "assign", {"run": asdict(run), "assign": asdict(cfg)})
    t0 = Timer()
    topk = topk or TopK(c, cfg.l, engine, device, cfg.block_rows, cfg.hnsw_m, cfg.hnsw_ef_search)
    build_s = t0.elapsed()
    n_rows = dict(zip(info.parts, info.counts))
    mine = ctx.shard(info.parts)
    cfp = centroids_fingerprint(cfg.centroids)
    recs = {p: part_record(info.store.root, p, n_rows[p], cfp) for p in mine}
    names = {p: part_name(info.store.root, p) for p in mine}  # labels follow the store's digits
    todo = [p for p in mine if not part_done(out, names[p], n_rows[p], cfg.l, recs[p])]
    resumed = len(mine) - len(todo)
    if resumed:
        log.info("resuming: %d of this rank's %d parts already labeled", resumed, len(mine))
    bar = progress(sum(n_rows[p] for p in mine), "assign", ctx, unit="row",
                   initial=sum(n_rows[p] for p in mine if p not in todo), share_dir=out)
    work_s, work_rows = 0.0, 0
    for p in todo:
        arr = info.store.load(cfg.kind, p, mmap=True)
        t = time.perf_counter()
        labels, sims, _ = label_rows(arr, topk, cfg.block_rows)
        work_s += time.perf_counter() - t
        work_rows += len(arr)
        write_labels(out, names[p], labels, sims, recs[p])  # the record last: done = recorded
        bar.set(parts=f"{todo.index(p) + 1 + resumed}/{len(mine)}")
        bar.update(len(arr))
        tracker.log({"assign/rows_per_s": work_rows / max(work_s, 1e-9), "assign/part": p})
    bar.close()

    recall = None
    if engine == "hnsw" and cfg.recall_rows and ctx.is_main:
        recall = measure_recall(info, c, topk, cfg, run.seed, device)
        log.info("approximate engine recall@%d = %.4f on %d rows", cfg.l, recall, cfg.recall_rows)
    stats = ctx.all_gather_object({"resumed": resumed, "work_s": work_s, "work_rows": work_rows})
    ctx.barrier()
    manifest = {}
    if ctx.is_main:
        manifest = write_manifest(out, info, cfg, state, engine, recall, stats, build_s, timer.elapsed(),
                                  ctx.world_size)
        if cfg.report:
            make_report(cfg.store, out, cfg.report_dir, cfg.report_clusters, cfg.report_members,
                        run.seed, tracker)
    tracker.finish()
    ctx.barrier()
    return manifest


def settle_engine(run: RunConfig, cfg: AssignConfig, rows: int, c, out: Path,
                  device: torch.device, ctx: DistContext) -> tuple[TopK | None, str, dict]:
    """(the probe's index or None, engine, state) that every rank uses for the centers ``c`` (K x D
    unit rows). Labels already on disk are reused only if they came from these exact centers and
    the same exact engine (torch and faiss may round a sim's last bit differently): ``state.json``
    records both, and any other state (or run.overwrite) removes the old label files first."""
    state = {"centroids_sha256": file_sha256(cfg.centroids), "k": len(c), "l": cfg.l, "kind": cfg.kind}
    st_path = out / "state.json"
    ctx.barrier()
    topk, engine, old = None, cfg.engine, None
    if ctx.is_main:
        clean_stale_tmp(out)
        old = read_json(st_path) if fs.isfile(st_path) else None
        if engine == "auto" and rows < AUTO_PROBE_MIN_ROWS:
            engine = "torch"  # the probe (~6 x 8k rows) would cost a noticeable share of the job
        if engine == "auto":
            if (not run.overwrite and old is not None and old.get("engine") in ("torch", "faiss")
                    and {k: old.get(k) for k in state} == state):
                engine = old["engine"]  # a resumed run keeps the engine its first parts used
            else:  # measured once, on rank 0; every rank uses the winner
                topk = TopK(c, cfg.l, "auto", device, cfg.block_rows)
                engine = topk.engine
    engine = ctx.broadcast_object(engine)
    state["engine"] = engine
    if ctx.is_main:
        settle_label_state(out, state, old, run.overwrite)
    ctx.barrier()
    return topk, engine, state


def measure_recall(info, c, topk: TopK, cfg: AssignConfig, seed: int, device) -> float:
    from clustering.data import draw_sample
    x, _, _ = draw_sample(info, cfg.recall_rows, seed + 1)
    exact = TopK(c, cfg.l, "torch", device, cfg.block_rows).search(x)[0]
    return recall_at_l(topk.search(x)[0], exact)


def write_manifest(out: Path, info, cfg: AssignConfig, state: dict, engine: str, recall, stats,
                   build_s: float, wall_s: float, world: int) -> dict:
    """From the label files themselves, so it is right after any number of resumes."""
    parts, invalid_total = [], 0
    for p, n in zip(info.parts, info.counts):
        lab = load_npy(labels_path(out, p), mmap=True)
        bad = int((lab[:, 0] < 0).sum())
        invalid_total += bad
        parts.append({"part": p, "rows": n, "invalid": bad})
    work_s = max(s["work_s"] for s in stats)
    work_rows = sum(s["work_rows"] for s in stats)
    manifest = {
        "complete": True, **state, "dim": info.dim, "store": str(cfg.store), "centroids": str(cfg.centroids),
        "engine": engine, "exact": engine != "hnsw", "recall_at_l": recall,
        "rows": info.rows, "invalid_rows": invalid_total, "parts": parts,
        "missing_parts": info.missing, "skipped_incomplete_parts": info.incomplete,
        "resumed_parts": sum(s["resumed"] for s in stats), "world_size": world,
        "index_build_s": build_s, "rows_per_s": work_rows / work_s if work_s > 0 else None,
        "wall_s": wall_s,
    }
    atomic_write_json(out / "manifest.json", manifest)
    log.info("labels for %d rows (%d invalid) of %d parts -> %s", info.rows, invalid_total, len(parts), fs.url_of(out))
    return manifest


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("assign", run_assign, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("assign")
