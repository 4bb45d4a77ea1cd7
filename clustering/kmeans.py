"""Stage 2a: spherical k-means of the embedding store into K centers (MLCD: K = 1M on LAION-400M).

    python -m clustering.kmeans --config configs/demo.yaml [cluster.k=512 ...]
    torchrun --nproc_per_node 8 -m clustering.kmeans --config ...    (method=torch, multi-node)

Methods (``cluster.method``):
- ``faiss``: faiss.Kmeans (spherical) on one process, all visible GPUs when faiss has them. Run in
  chunks of ``checkpoint_every`` iterations from the previous centroids, so a killed run resumes;
  a chunk boundary costs one index rebuild (K x D copy), nothing else.
- ``two_level``: coarse k-means into ~sqrt(K) groups, then each group into its share of K (the
  scheme of faiss.contrib.clustering.two_level_clustering, whose second level silently runs the
  default 25 iterations; here both levels use ``niter``), checkpointed per group. For K >= 1M on
  one node: each second-level job is small, total cost ~ N*D*(sqrt(K) + K/sqrt(K)) per iteration.
- ``torch``: Lloyd iterations over torch.distributed: each rank holds its parts' share of the
  sample, assigns locally (blocked GEMM + argmax on its device), and all-reduces per-center sums,
  counts and the objective. Spans nodes (FAISS doesn't); same result as one process up to float
  summation order. Empty clusters are split off the largest one, like faiss.
- ``auto``: ``torch`` under torchrun with more than one rank, else ``faiss``.

Every method starts from the same seeded choice of K sample points. Outputs in ``out_dir``:
``centroids.npy`` (float32 K x D, unit rows) and ``clustering.json`` (written last: complete).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clustering.data import StoreInfo, draw_sample, open_store
from clustering.topk import faiss_gpus, nearest
from pipeline.core import fs
from pipeline.core.config import ConfigError, RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.io import atomic_save_npy, atomic_write_json, load_npy, read_json
from pipeline.core.store import KINDS
from pipeline.core.tracking import Timer, Tracker, progress

log = logging.getLogger("mlcd.cluster")
METHODS = ("auto", "faiss", "two_level", "torch")
KMEANSPP_MAX_K = 8192
SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when splitting a large cluster into an empty one


@dataclass
class KMeansConfig:
    store: str = "${run.out_dir}/store"
    kind: str = "joint"                 # img | text | joint
    out_dir: str = "${run.out_dir}/clusters"
    k: int = 1024
    niter: int = 20
    points_per_centroid: int = 256      # sample = k * this (faiss: 39..256; 50..1000 is normal)
    max_sample: int = 0                 # cap on the sample size (0: none)
    method: str = "auto"                # auto | faiss | two_level | torch
    coarse_k: int = 0                   # two_level: first-level groups (0: round(sqrt(k)))
    checkpoint_every: int = 5           # iterations per checkpoint (two_level: + each group's result)
    tiny_cluster: int = 3               # clusters with fewer sample points are reported as tiny
    gpu: bool = True                    # use faiss/torch GPUs when present
    block_rows: int = 32768             # rows per GEMM block (method=torch)
    init: str = "auto"                  # random | kmeans++ | auto (kmeans++ when k <= 8192)
    init_candidates: int = 8            # k-means++ picks among k * this seeded sample rows
    verbose: bool = False               # faiss's own per-iteration prints
    nredo: int = 1                      # independent runs (seeds run.seed + 1000003 r); best objective kept

    def __post_init__(self):
        check(self.kind in KINDS, "kind", self.kind, f"must be one of {KINDS}")
        check(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        check(self.k >= 2, "k", self.k, "must be >= 2")
        check(self.niter >= 1, "niter", self.niter, "must be >= 1")
        check(self.points_per_centroid >= 1, "points_per_centroid", self.points_per_centroid, "must be >= 1")
        check(self.max_sample >= 0, "max_sample", self.max_sample, "must be >= 0")
        check(self.coarse_k >= 0, "coarse_k", self.coarse_k, "must be >= 0")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        check(self.init in ("auto", "random", "kmeans++"), "init", self.init, "must be auto, random or kmeans++")
        check(self.init_candidates >= 1, "init_candidates", self.init_candidates, "must be >= 1")
        check(self.block_rows >= 1, "block_rows", self.block_rows, "must be >= 1")
        check(self.nredo >= 1, "nredo", self.nredo, "must be >= 1")


# ---------------------------------------------------------------- checkpoints

class Checkpoint:
    """``{name}.json`` names the newest ``{name}_{tag}.npy`` (centers); the npy is written first,
    so a kill at any point leaves a consistent pair. ``key`` fingerprints what the run depends on;
    a checkpoint with another key is ignored."""

    def __init__(self, folder: Path, key: str, enabled: bool = True):
        self.folder, self.key, self.enabled = folder, key, enabled

    def load(self, name: str = "state") -> tuple[np.ndarray | None, dict]:
        p = self.folder / f"{name}.json"
        if not fs.isfile(p):
            return None, {}
        st = read_json(p)
        if st.get("key") != self.key:
            log.warning("ignoring checkpoint %s from a different run config", fs.url_of(p))
            return None, {}
        return load_npy(self.folder / st["file"]), st

    def resume(self, niter: int, prefix: str = "") -> tuple[np.ndarray | None, int, list[float], list[int]]:
        """(centers or None, iterations done, objective and split histories so far) of the newest
        iteration checkpoint: where train_faiss and train_torch pick up after a kill."""
        c, st = self.load()
        start = st.get("iteration", 0) if c is not None else 0
        if start:
            log.info("%sresuming k-means at iteration %d/%d", prefix, start, niter)
        return c, start, list(st.get("obj", [])), list(st.get("nsplit", []))

    def save(self, arr: np.ndarray, state: dict, name: str = "state", tag: str = "") -> None:
        if not self.enabled:
            return
        old = self.folder / f"{name}.json"
        old_file = read_json(old).get("file") if fs.isfile(old) else None
        fname = f"{name}_{tag}.npy"
        atomic_save_npy(self.folder / fname, arr)
        atomic_write_json(old, {**state, "key": self.key, "file": fname})
        if old_file and old_file != fname:
            fs.rm(self.folder / old_file)


# ---------------------------------------------------------------- methods

def init_positions(n: int, k: int, seed: int) -> np.ndarray:
    """Which sample rows seed the K centers (same for every method and world size)."""
    return np.random.default_rng([seed, 0x1417]).choice(n, size=k, replace=False)


def seeded_init(x: np.ndarray, k: int, seed: int, pp: bool, candidates: int) -> np.ndarray:
    """K initial centers among seeded rows of ``x``: k-means++ over k * candidates of them, or
    (pp False) the first k. The candidates are drawn either way, so the seeded rows don't depend
    on ``pp``."""
    cand = x[init_positions(len(x), min(len(x), k * candidates), seed)]
    return cand[kmeanspp(torch.from_numpy(cand), k, seed)] if pp else cand[:k]


def train_faiss(x: np.ndarray, init: np.ndarray, niter: int, seed: int, ckpt: Checkpoint,
                every: int, gpus: int = 0, verbose: bool = False, tracker: Tracker | None = None,
                prefix: str = "", level: int = logging.INFO) -> tuple[np.ndarray, dict]:
    """faiss spherical k-means in chunks of ``every`` iterations, resuming from ``ckpt``."""
    import faiss
    c, start, obj, nsplit = ckpt.resume(niter, prefix)
    c = init if c is None else c
    while start < niter:
        n_it = min(every, niter - start)
        # max_points_per_centroid: the sample is already drawn; faiss must not subsample again
        km = faiss.Kmeans(x.shape[1], len(c), niter=n_it, spherical=True, seed=seed + start,
                          gpu=gpus if gpus > 0 else False, verbose=verbose,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)
        km.train(x, init_centroids=c)
        c, stats = km.centroids, km.iteration_stats or []
        assert c is not None, "faiss.Kmeans.train sets centroids"
        obj += [float(s["obj"]) for s in stats]
        nsplit += [int(s["nsplit"]) for s in stats]
        start += n_it
        ckpt.save(c, {"iteration": start, "obj": obj, "nsplit": nsplit}, tag=f"{start:06d}")
        if tracker is not None:
            tracker.log({f"{prefix}kmeans/objective": obj[-1], f"{prefix}kmeans/iteration": start})
        log.log(level, "%siteration %d/%d objective %.6g", prefix, start, niter, obj[-1])
    return np.ascontiguousarray(c, dtype=np.float32), {"obj": obj, "nsplit": nsplit}


def allocate(sizes: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` centers over groups in proportion to their sizes, never more than a group has
    points, at least one per non-empty group (largest remainders first)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if k > sizes.sum():
        raise ValueError(f"k={k} exceeds the {sizes.sum()} points")
    share = sizes * k / max(sizes.sum(), 1)
    alloc = np.minimum(np.maximum(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64)), sizes)
    while alloc.sum() > k:  # the at-least-one rule overshot: take from the largest allocations
        alloc[np.argmax(alloc - share)] -= 1
    while alloc.sum() < k:
        room = np.where(alloc < sizes, share - alloc, -np.inf)
        alloc[np.argmax(room)] += 1
    return alloc


def train_two_level(x: np.ndarray, k: int, k1: int, niter: int, seed: int, ckpt: Checkpoint,
                    every: int, gpus: int, verbose: bool, tracker: Tracker | None, ctx: DistContext,
                    pp: bool = True, init_candidates: int = 8) -> tuple[np.ndarray, dict]:
    k1 = max(2, min(k1 or round(math.sqrt(k)), k // 2))
    c1, st1 = train_faiss(x, seeded_init(x, k1, seed, pp, init_candidates), niter, seed,
                          Checkpoint(ckpt.folder / "level1", ckpt.key, ckpt.enabled), every,
                          gpus, verbose, tracker, prefix="level1/")
    xt = torch.from_numpy(x)
    a1 = nearest(xt, torch.from_numpy(c1).T.contiguous())[0].numpy()
    order = np.argsort(a1, kind="stable")
    sizes = np.bincount(a1, minlength=k1)
    alloc = allocate(sizes, k)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    sub_dir = ckpt.folder / "level2"
    fs.makedirs(sub_dir)
    out, obj2 = [], np.zeros(niter)
    bar = progress(k1, "level-2 k-means", ctx, unit="group")
    for g in range(k1):
        sub = Checkpoint(sub_dir / f"g{g:07d}", ckpt.key, ckpt.enabled)
        cg, st = sub.load("done")
        if cg is None and alloc[g] > 0:
            xg = x[order[bounds[g]:bounds[g + 1]]]
            if alloc[g] == len(xg) or alloc[g] == 1:  # nothing to iterate: points (or their mean)
                cg = xg if alloc[g] == len(xg) else xg.mean(0, keepdims=True)
                cg = cg / np.maximum(np.linalg.norm(cg, axis=1, keepdims=True), 1e-12)
                st = {"obj": [float((xg * cg[0]).sum()) if alloc[g] == 1 else float(len(xg))] * niter}
            else:
                # within a group only the final centers matter: one chunk, checkpoint when done
                ig = seeded_init(xg, int(alloc[g]), seed + g, pp, init_candidates)
                cg, st = train_faiss(xg, ig, niter,
                                     seed + g, Checkpoint(sub.folder, ckpt.key, False), niter, gpus,
                                     level=logging.DEBUG)
            sub.save(cg.astype(np.float32), {"obj": st["obj"]}, name="done", tag="c")
        if alloc[g] > 0:
            assert cg is not None  # loaded or trained above
            out.append(cg)
            o = np.asarray(st["obj"], dtype=np.float64)  # faiss may stop early: hold its last value
            obj2 += np.concatenate([o, np.full(niter - len(o), o[-1])]) if len(o) < niter else o[:niter]
        bar.update(1)
    bar.close()
    c = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    return c, {"obj": obj2.tolist(), "level1_obj": st1["obj"], "coarse_k": k1,
               "level2_k": {"min": int(alloc.min()), "max": int(alloc.max())}, "nsplit": st1["nsplit"]}


def kmeanspp(cand: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding (sklearn's variant: 2 + log k D^2-sampled trials per step, keep
    the one that lowers the potential most) among candidate rows. K sequential steps of
    m x trials GEMMs, K*m*D*trials flops in all (m = candidates), so only for moderate K. Random
    seeding leaves well-separated clusters merged (two seeds in one, none in another), which
    Lloyd iterations can't undo."""
    g = torch.Generator().manual_seed(seed)
    m, trials = len(cand), 2 + int(math.log(k))
    idx = [int(torch.randint(m, (1,), generator=g))]
    d2 = (2 - 2 * (cand @ cand[idx[0]])).clamp_(min=0).double().cpu()
    for _ in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than k: take any unused row
            idx.append(next(i for i in range(m) if i not in set(idx)))
            continue
        js = torch.multinomial(d2, trials, replacement=True, generator=g)
        dj = (2 - 2 * (cand @ cand[js.to(cand.device)].T)).clamp_(min=0).double().cpu()  # m x trials
        new = torch.minimum(d2[:, None], dj)
        best = int(torch.argmin(new.sum(0)))
        idx.append(int(js[best]))
        d2 = new[:, best].contiguous()
    return np.asarray(idx)


def use_kmeanspp(init: str, k: int) -> bool:
    return init == "kmeans++" or (init == "auto" and k <= KMEANSPP_MAX_K)


def _gather_init(x: torch.Tensor, info: StoreInfo, my_parts: list[int], per_part: dict[int, int],
                 cfg: KMeansConfig, seed: int, ctx: DistContext) -> tuple[torch.Tensor, int]:
    """The K initial centers from seeded sample rows, assembled from whichever rank holds each
    (all-reduce of a mostly-zero m x D tensor: no rank needs the whole sample). k-means++ runs
    on rank 0 over m = k * init_candidates rows and its choice is broadcast."""
    k = cfg.k
    counts = {}
    for d in ctx.all_gather_object(per_part):
        counts.update(d)
    g_off, off = {}, 0
    for p in info.parts:
        g_off[p], off = off, off + counts.get(p, 0)
    n_total = off
    if k > n_total:
        raise ConfigError(f"cluster.k={k} exceeds the sample's {n_total} valid rows")
    pp = use_kmeanspp(cfg.init, k)
    pos = init_positions(n_total, min(n_total, k * cfg.init_candidates) if pp else k, seed)
    cand = torch.zeros(len(pos), x.shape[1], dtype=torch.float32, device=x.device)
    l_off = 0
    for p in my_parts:
        lo, hi = g_off[p], g_off[p] + per_part[p]
        sel = np.nonzero((pos >= lo) & (pos < hi))[0]
        if len(sel):
            rows = torch.from_numpy(pos[sel] - lo + l_off).to(x.device)
            cand[torch.from_numpy(sel).to(x.device)] = x[rows]
        l_off += per_part[p]
    ctx.all_reduce_(cand)
    if not pp:
        return cand, n_total
    choice = kmeanspp(cand, k, seed) if ctx.is_main else None
    choice = ctx.broadcast_object(choice)
    return cand[torch.from_numpy(choice).to(x.device)].contiguous(), n_total


def split_empty(c: torch.Tensor, counts: torch.Tensor) -> int:
    """faiss's rule, deterministic: each empty center becomes a perturbed copy of the currently
    largest cluster's center, which takes the opposite perturbation; counts are split too."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1
    n = 0
    for j in empty:
        big = int(torch.argmax(counts))
        if counts[big] < 2:
            break
        c[j] = c[big] * (1 + SPLIT_EPS * sign)
        c[big] = c[big] * (1 - SPLIT_EPS * sign)
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]
        n += 1
    return n


def train_torch(x: torch.Tensor, init: torch.Tensor, niter: int, ckpt: Checkpoint, every: int,
                ctx: DistContext, block_rows: int, tracker: Tracker | None = None
                ) -> tuple[np.ndarray, dict]:
    """Distributed Lloyd iterations; every rank ends with the same centers."""
    c_np, start, obj, nsplit = ckpt.resume(niter)
    c = init if c_np is None else torch.from_numpy(c_np).to(x.device)
    k, d = c.shape
    bar = progress(niter, "k-means", ctx, unit="it", initial=start, share_dir=ckpt.folder, replicated=True)
    for it in range(start, niter):
        ct = c.T.contiguous()
        sums = torch.zeros(k, d, dtype=torch.float32, device=x.device)
        counts = torch.zeros(k, dtype=torch.float64, device=x.device)
        tot = torch.zeros(1, dtype=torch.float64, device=x.device)
        for s in range(0, len(x), block_rows):
            xb = x[s:s + block_rows]
            v, i = (xb @ ct).max(dim=1)
            sums.index_add_(0, i, xb)
            counts += torch.bincount(i, minlength=k).to(counts.dtype)
            tot += v.double().sum()
        for t in (sums, counts, tot):
            ctx.all_reduce_(t)
        new = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
        n_split = split_empty(new, counts)
        c = new / new.norm(dim=1, keepdim=True).clamp(min=1e-12)
        obj.append(float(tot))
        nsplit.append(n_split)
        if tracker is not None:
            tracker.log({"kmeans/objective": obj[-1], "kmeans/nsplit": n_split, "kmeans/iteration": it + 1})
        bar.set(objective=obj[-1], empty_split=n_split)
        bar.update(1)
        if (it + 1) % every == 0 or it + 1 == niter:
            if ctx.is_main:
                ckpt.save(c.cpu().numpy(), {"iteration": it + 1, "obj": obj, "nsplit": nsplit},
                          tag=f"{it + 1:06d}")
            ctx.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
            log.info("iteration %d/%d objective %.6g", it + 1, niter, obj[-1])
    bar.close()
    return c.cpu().numpy().astype(np.float32), {"obj": obj, "nsplit": nsplit}


# ---------------------------------------------------------------- driver

def sample_size(cfg: KMeansConfig, rows: int) -> int:
    n = cfg.k * cfg.points_per_centroid
    if cfg.max_sample:
        n = min(n, cfg.max_sample)
    return min(n, rows)


def cluster_stats(sizes: np.ndarray, tiny: int) -> dict:
    q = np.percentile(sizes, [1, 50, 99]).tolist() if len(sizes) else [0, 0, 0]
    return {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
            "p01": q[0], "median": q[1], "p99": q[2], "empty": int((sizes == 0).sum()),
            f"tiny_lt_{tiny}": int(((sizes > 0) & (sizes < tiny)).sum()),
            "imbalance": float((sizes.astype(np.float64) ** 2).sum() * len(sizes) / max(sizes.sum(), 1) ** 2)}


def resolve_method(method: str, world_size: int) -> str:
    """``auto`` is torch under several ranks, else faiss; faiss and two_level run in one process."""
    resolved = method if method != "auto" else ("torch" if world_size > 1 else "faiss")
    if resolved != "torch" and world_size > 1:
        raise ConfigError(f"cluster.method={resolved} runs in one process; use method=torch (or auto) "
                          f"with {world_size} ranks")
    return resolved


def result_key(run: RunConfig, cfg: KMeansConfig) -> str:
    """What the result depends on (not logging knobs): a checkpoint or result with another key is stale."""
    key_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("verbose", "tiny_cluster")}
    return hashlib.sha256(json.dumps([key_cfg, run.seed], sort_keys=True).encode()).hexdigest()[:16]


def previous_result(run: RunConfig, out: Path, key: str, ctx: DistContext) -> dict | None:
    """The complete result already in ``out`` for this key (nothing to do), else None. With
    run.overwrite the old result and checkpoints are cleared first."""
    done = out / "clustering.json"
    if run.overwrite:
        ctx.barrier()  # every rank has read the out dir before rank 0 clears it
        if ctx.is_main:
            fs.rm(done)
            fs.rmtree(out / "ckpt")
        ctx.barrier()
    elif fs.isfile(done) and read_json(done).get("key") == key:
        log.info("%s is complete (same config); nothing to do", fs.url_of(done))
        return read_json(done)
    return None


def train_method(method: str, x: torch.Tensor, x_np: np.ndarray, init: torch.Tensor, cfg: KMeansConfig,
                 seed: int, ckpt: Checkpoint, gpus: int, tracker: Tracker, ctx: DistContext
                 ) -> tuple[np.ndarray, dict]:
    """One k-means run from ``init`` with the resolved method: (centers, per-iteration history)."""
    if method == "torch":
        return train_torch(x, init, cfg.niter, ckpt, cfg.checkpoint_every, ctx, cfg.block_rows, tracker)
    if method == "faiss":
        return train_faiss(x_np, init.cpu().numpy(), cfg.niter, seed, ckpt, cfg.checkpoint_every,
                           gpus, cfg.verbose, tracker)
    return train_two_level(x_np, cfg.k, cfg.coarse_k, cfg.niter, seed, ckpt, cfg.checkpoint_every, gpus,
                           cfg.verbose, tracker, ctx,
                           use_kmeanspp(cfg.init, cfg.coarse_k or round(math.sqrt(cfg.k))), cfg.init_candidates)


def sample_sizes(x: torch.Tensor, c: np.ndarray, k: int, block_rows: int, device: torch.device,
                 ctx: DistContext) -> tuple[np.ndarray, float]:
    """Cluster sizes on the sample under the final centers and the objective (sum of similarities
    to the nearest center), over all ranks: one extra assignment pass (GEMM + argmax)."""
    idx, sim = nearest(x, torch.from_numpy(c).to(device).T.contiguous(), block_rows)
    sizes = ctx.all_reduce_(torch.bincount(idx, minlength=k).to(torch.int64)).cpu().numpy()
    return sizes, float(ctx.all_reduce_(sim.double().sum().reshape(1)).cpu()[0])


def write_result(out: Path, c: np.ndarray, sizes: np.ndarray, result: dict, tracker: Tracker) -> None:
    """Rank 0: centers, sample sizes, then clustering.json (last: it marks the run complete)."""
    atomic_save_npy(out / "centroids.npy", c)
    atomic_save_npy(out / "sizes_sample.npy", sizes.astype(np.int64))
    atomic_write_json(out / "clustering.json", result)
    fs.rmtree(out / "ckpt")
    tracker.log({"kmeans/final_objective": result["objective_final"],
                 "kmeans/empty": result["cluster_sizes"]["empty"], "kmeans/wall_s": result["wall_s"]})
    log.info("k-means: K=%d D=%d sample=%d in %.1f s (train %.1f s); empty %d; -> %s", result["k"],
             result["dim"], result["sample_size"], result["wall_s"], result["train_s"],
             result["cluster_sizes"]["empty"], fs.url_of(out))


def run_kmeans(run: RunConfig, cfg: KMeansConfig, ctx: DistContext) -> dict:
    timer = Timer()
    method = resolve_method(cfg.method, ctx.world_size)
    # all input checks before anything is written
    info = ctx.agree(lambda: open_store(cfg.store, cfg.kind))
    n = sample_size(cfg, info.rows)
    if cfg.k > n:
        raise ConfigError(f"cluster.k={cfg.k} is larger than the sample ({n} rows; the store "
                          f"{cfg.store} has {info.rows})")
    out = ctx.agree(lambda: prepare_out_dir(cfg.out_dir, run, {"run": run, "cluster": cfg}, "cluster"))
    key = result_key(run, cfg)
    if (prev := previous_result(run, out, key, ctx)) is not None:
        return prev

    use_gpu = cfg.gpu and torch.cuda.is_available()
    gpus = faiss_gpus() if cfg.gpu else 0
    tracker = Tracker(run, ctx, str(out), "cluster", {"run": asdict(run), "cluster": asdict(cfg)})
    ckpt = Checkpoint(out / "ckpt", key, enabled=True)
    my_parts = ctx.shard(info.parts)
    t_sample = Timer()
    x_np, per_part, bad = draw_sample(info, n, run.seed, parts=my_parts)
    # nccl collectives need device tensors: under nccl every collective runs on ctx.device
    device = ctx.device if (use_gpu or ctx.backend == "nccl") else torch.device("cpu")
    bad = int(ctx.all_reduce_(torch.tensor([bad], dtype=torch.int64, device=device))[0])
    log.info("sample: %d rows of %s_emb (%d parts here) in %.1f s; %d invalid rows dropped",
             len(x_np), cfg.kind, len(my_parts), t_sample.elapsed(), bad)
    # method=torch keeps each rank's share on its GPU; faiss keeps the sample in host memory and
    # streams it (so does the final size pass, block by block)
    x = torch.from_numpy(x_np).to(device) if method == "torch" else torch.from_numpy(x_np)
    # cluster.nredo: independent runs from differently seeded inits; the one with the best final
    # objective (sum of similarities to the nearest center) is kept, like faiss's nredo. Costs
    # nredo x the training time; run 0 is the nredo=1 run, so a restart can only improve on it.
    best, redo_obj = None, []
    for r in range(cfg.nredo):
        seed = run.seed + 1_000_003 * r
        rck = ckpt if r == 0 else Checkpoint(out / "ckpt" / f"redo{r}", key, enabled=True)
        init, n_valid = _gather_init(x, info, my_parts, per_part, cfg, seed, ctx)
        t_train = Timer()
        c, hist = train_method(method, x, x_np, init, cfg, seed, rck, gpus, tracker, ctx)
        train_s = t_train.elapsed()
        sizes, final_obj = sample_sizes(x, c, cfg.k, cfg.block_rows, device, ctx)
        redo_obj.append(final_obj)
        if cfg.nredo > 1:
            log.info("k-means run %d/%d: objective %.6g", r + 1, cfg.nredo, final_obj)
        if best is None or final_obj > best[3]:
            best = (c, hist, sizes, final_obj, train_s, r)
    assert best is not None  # nredo >= 1
    c, hist, sizes, final_obj, train_s, best_redo = best
    result = {
        "complete": True, "key": key, "k": cfg.k, "dim": info.dim, "kind": cfg.kind, "method": method,
        "store": str(cfg.store), "store_rows": info.rows, "store_parts": len(info.parts),
        "missing_parts": info.missing, "sample_target": n, "sample_size": n_valid,
        "invalid_rows_in_sample": bad, "niter": cfg.niter, "objective": hist["obj"],
        "iterations_run": len(hist["obj"]),  # faiss ends a chunk early once the objective stops moving
        "objective_final": final_obj, "mean_similarity": final_obj / max(n_valid, 1),
        "splits_per_iteration": hist.get("nsplit", []),
        "nredo": cfg.nredo, "redo_objectives": redo_obj, "best_redo": best_redo,
        **{k: v for k, v in hist.items() if k not in ("obj", "nsplit")},
        "cluster_sizes": cluster_stats(sizes, cfg.tiny_cluster),
        "empty_clusters_handling": "during training an empty cluster is re-seeded by splitting the "
                                   "largest one (faiss rule); clusters still empty or tiny at the end "
                                   "are kept (assignment over the full store may fill them)",
        "world_size": ctx.world_size, "gpus": gpus if method != "torch" else int(use_gpu),
        "train_s": train_s, "wall_s": timer.elapsed(),
        "config": {"run": asdict(run), "cluster": asdict(cfg)},
    }
    if ctx.is_main:
        write_result(out, c, sizes, result, tracker)
    tracker.finish()
    ctx.barrier()
    return result


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("cluster", run_kmeans, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("cluster")
