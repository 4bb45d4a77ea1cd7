"""Exact (and approximate) top-l nearest centers by cosine similarity.

Engines:
- ``torch``: pipeline/core/topl.py's ExactTopL (blocked fp32 GEMM into one reused score tile + the
  two-pass partial top-l `top_l_grouped`); it lives in pipeline/ because stage 1 labels with
  the same kernel when it is given centers (fused embed -> assign).
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
from typing import Any

import numpy as np
import torch

from pipeline.core.topl import ExactTopL, tile_rows, top_l_grouped

__all__ = ["ENGINES", "TopK", "faiss_gpus", "nearest", "recall_at_l", "top_l_grouped"]
ENGINES = ("auto", "torch", "faiss", "hnsw")
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
        self.tile_rows = tile_rows(k, self.device, block_rows)
        self.engine, self.probe = engine, None
        if engine in ("torch", "auto"):
            self.exact = ExactTopL(c, l, self.device, block_rows)
            self.group = self.exact.group
        if engine in ("faiss", "auto"):
            import faiss
            index: Any = faiss.IndexFlatIP(d)  # or its GPU copy
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
                del self.exact

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
        if self.engine == "torch":
            return self.exact.search(x)
        sims, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), self.l)
        return labels, sims


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
