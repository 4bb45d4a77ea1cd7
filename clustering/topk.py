"""Exact (and approximate) top-l nearest centers by cosine similarity.

Engines:
- ``torch``: blocked fp32 GEMM into one reused score tile + a partial top-l (torch.topk selects,
  it does not sort the row), results written in place into the output arrays: no per-block
  allocation. On CPU the tile is sized to stay in the last-level cache (GEMM writes it, top-l
  reads it back from cache instead of memory); on GPU it is one cuBLAS GEMM per block.
  Memory: tile_rows x K floats. The two-pass top-l (`top_l_grouped`) measured 0.94-0.95 of the
  bare GEMM rate on an H200 (torch.topk alone: 0.72-0.74) and 0.72-0.77 on 2 CPU threads
  (docs/SCALING.md, stage 2b).
- ``faiss``: IndexFlatIP (on all GPUs when faiss has them).
- ``auto``: times torch and faiss on the same probe rows once (at construction; the probe is
  sized to ~0.2 s of GEMM) and keeps faiss only if it is > 5% faster: torch's results do not
  depend on the thread count, faiss's do (in a last bit: a resume with other threads could swap
  near-tied labels). `make bench` (clustering/bench.py) prints both against the bare GEMM rate.
  clustering/assign.py skips the probe (torch) for stores under 1M rows.
- ``hnsw``: faiss IndexHNSWFlat over the centers, approximate; for K ~ 1M where the exact GEMM
  costs K*D flops per row. Its recall against exact search is measured and reported by callers.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

ENGINES = ("auto", "torch", "faiss", "hnsw")
CPU_TILE_BYTES = 4 << 20  # CPU score tile per thread (2 threads: 8 MiB, stays in L3); measured
#                           on 2 and 16 threads: smaller tiles lose on many threads (per-op cost)
GROUP = 16  # top-l in two passes over column groups (0 = one torch.topk over the whole row)
log = logging.getLogger("mlcd")


def faiss_gpus() -> int:
    """GPUs faiss can use; 0 with a CPU build or with no faiss at all (the torch engines need none)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class TopK:
    """Top-l search against fixed unit-norm centers ``c`` (K x D float32)."""

    def __init__(self, c: np.ndarray, l: int, engine: str = "torch", device: torch.device | None = None,
                 block_rows: int = 16384, hnsw_m: int = 32, hnsw_ef_search: int = 128,
                 hnsw_ef_construction: int = 80):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (one of {ENGINES})")
        self.l, self.block_rows = l, block_rows
        self.device = device or torch.device("cpu")
        c = np.ascontiguousarray(c, dtype=np.float32)
        k, d = c.shape
        if self.device.type == "cpu":
            tile = CPU_TILE_BYTES * torch.get_num_threads()
            self.tile_rows = max(64, min(block_rows, tile // (4 * k)))
        else:
            self.tile_rows = block_rows
        self.engine, self.probe = engine, None
        if engine in ("torch", "auto"):
            # padded to whole groups; padded columns are set to -inf after each GEMM
            self.group = GROUP if GROUP and k >= 4 * GROUP * l else 0
            kp = -(-k // self.group) * self.group if self.group else k
            ct = torch.zeros(d, kp)
            ct[:, :k] = torch.from_numpy(c).T
            self.ct, self.k = ct.to(self.device), k  # D x K_padded
            self._tile = None
        if engine in ("faiss", "auto"):
            import faiss
            index = faiss.IndexFlatIP(d)
            if faiss_gpus() > 0:
                index = faiss.index_cpu_to_all_gpus(index)
            index.add(c)
            self.index = index
        if engine == "hnsw":
            import faiss
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw_ef_construction
            index.hnsw.efSearch = max(hnsw_ef_search, l)
            index.add(c)
            self.index = index
        if engine == "auto":
            self.engine, self.probe = self._pick(k, d)
            if self.engine == "torch":
                del self.index
            else:
                del self.ct

    def _pick(self, k: int, d: int) -> tuple[str, dict]:
        """Times both exact engines on the same random unit rows (best of 2 after a warm-up)."""
        rows = int(min(8192, max(256, 2e10 / (2 * k * d))))  # ~0.2 s of GEMM at ~100 GFLOP/s
        x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        secs: dict[str, list[float]] = {"torch": [], "faiss": []}
        for name in ("torch", "faiss") * 3:  # interleaved; the first of each is a warm-up
            self.engine = name
            t = time.perf_counter()
            self.search(x)
            secs[name].append(time.perf_counter() - t)
        best = {n: min(ts[1:]) for n, ts in secs.items()}
        pick = "faiss" if best["faiss"] < best["torch"] / 1.05 else "torch"
        gflops = {n: 2 * rows * k * d / t / 1e9 for n, t in best.items()}
        log.info("engine auto: torch %.0f GFLOP/s, faiss %.0f GFLOP/s on %d probe rows -> %s",
                 gflops["torch"], gflops["faiss"], rows, pick)
        return pick, gflops

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 N x l best first, sims float32 N x l) for unit rows ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.engine != "torch":
            sims, labels = self.index.search(x, self.l)
            return labels, sims
        out_i = np.empty((len(x), self.l), np.int64)
        out_s = np.empty((len(x), self.l), np.float32)
        cpu = self.device.type == "cpu"
        ti, ts = torch.from_numpy(out_i), torch.from_numpy(out_s)
        tile = self._tile_buffer()
        r = self.tile_rows
        with torch.inference_mode():
            for s in range(0, len(x), r):
                xb = torch.from_numpy(x[s:s + r]).to(self.device, non_blocking=True)
                n = len(xb)
                torch.mm(xb, self.ct, out=tile[:n])
                if self.group:
                    tile[:n, self.k:] = -torch.inf
                    v, i = top_l_grouped(tile[:n], self.l, self.group)
                    ts[s:s + n].copy_(v)
                    ti[s:s + n].copy_(i)
                elif cpu:  # straight into the output arrays
                    torch.topk(tile[:n], self.l, dim=1, largest=True, sorted=True, out=(ts[s:s + n], ti[s:s + n]))
                else:
                    v, i = torch.topk(tile[:n], self.l, dim=1, largest=True, sorted=True)
                    ts[s:s + n].copy_(v)
                    ti[s:s + n].copy_(i)
        return out_i, out_s

    def _tile_buffer(self) -> torch.Tensor:
        if self._tile is None:
            self._tile = torch.empty(self.tile_rows, self.ct.shape[1], device=self.device)
        return self._tile


def top_l_grouped(scores: torch.Tensor, l: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-l (sorted) of each row of ``scores`` (R x K, K = g * C) in two cheap passes
    instead of one selection over K: column j belongs to group j % C; the row's l best lie in
    the l groups with the largest maxima (each group holding one of them has a max >= the l-th
    best, and at most l groups do), so take per-group maxima (an elementwise max of g contiguous
    slices: vectorized, one read of the row), select l groups, then select among their g * l
    values. Ties may pick a different index of equal value than a full topk."""
    r, k = scores.shape
    c = k // g
    sv = scores.view(r, g, c)
    groups = torch.topk(sv.amax(dim=1), l, dim=1, sorted=False).indices  # (R, l)
    cand = sv.gather(2, groups[:, None, :].expand(r, g, l)).reshape(r, g * l)
    v, p = torch.topk(cand, l, dim=1, largest=True, sorted=True)
    return v, groups.gather(1, p % l) + c * (p // l)


def nearest(x: torch.Tensor, ct: torch.Tensor, block_rows: int = 16384
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 (index, sim) of rows ``x`` against transposed centers ``ct`` (D x K), blocked; blocks
    move to ``ct``'s device (x may stay in host memory), results come back on ``ct``'s device."""
    idx = torch.empty(len(x), dtype=torch.long, device=ct.device)
    sim = torch.empty(len(x), dtype=torch.float32, device=ct.device)
    for s in range(0, len(x), block_rows):
        v, i = (x[s:s + block_rows].to(ct.device, non_blocking=True) @ ct).max(dim=1)
        idx[s:s + len(v)], sim[s:s + len(v)] = i, v
    return idx, sim


def recall_at_l(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-l found by the approximate top-l."""
    hit = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hit / exact.size if exact.size else 1.0
