"""The exact top-l kernel on torch tensors, shared by stage 2b (clustering/assign.py, through
clustering/topk.py's engines) and stage 1's fused labelling (pipeline/embed.py with
``embed.assign_centroids``). One place, so both give the same labels bit for bit: same row
cleaning, same blocks, same tiles, same GEMM and selection.

Blocked fp32 GEMM into one reused score tile + a partial top-l (torch.topk selects, it does not
sort the row), results written in place into the output arrays: no per-block allocation. On CPU
the tile is sized to stay in the last-level cache (GEMM writes it, top-l reads it back from cache
instead of memory); on GPU it is one cuBLAS GEMM per block. Memory: tile_rows x K floats. The
two-pass top-l (`top_l_grouped`) measured 0.94-0.95 of the bare GEMM rate on an H200 (torch.topk
alone: 0.72-0.74) and 0.72-0.77 on 2 CPU threads (docs/SCALING.md, stage 2b).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.core.io import load_npy
from pipeline.core.store import StoreError

CPU_TILE_BYTES = 4 << 20  # CPU score tile per thread (2 threads: 8 MiB, stays in L3); measured
#                           on 2 and 16 threads: smaller tiles lose on many threads (per-op cost)
GROUP = 16  # top-l in two passes over column groups (0 = one torch.topk over the whole row)
EPS_NORM = 1e-6


def clean_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 unit rows and the validity mask (finite and norm > EPS_NORM); invalid rows zeroed."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(x, axis=1)
    valid = np.isfinite(norms) & (norms > EPS_NORM)
    out = np.zeros_like(x)
    out[valid] = x[valid] / norms[valid, None]
    return out, valid


def file_sha256(path: str | Path) -> str:
    from pipeline.core import fs
    h = hashlib.sha256()
    with fs.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def load_centroids(path: str, dim: int, l: int, key: str = "assign") -> np.ndarray:
    """Unit-norm float32 K x D centers; one line naming the file (or ``{key}.l``) when unusable."""
    from pipeline.core import fs
    p = Path(path)
    if not fs.isfile(fs.check(path, "centroids")):
        raise StoreError(f"centroids file {path} does not exist (run clustering.kmeans first)")
    c = load_npy(p)
    if c.ndim != 2 or c.shape[1] != dim:
        raise StoreError(f"{p}: centroids of shape {c.shape} don't match the store's dim {dim}")
    if l > c.shape[0]:
        raise StoreError(f"{key}.l={l} exceeds the {c.shape[0]} centers in {p}")
    c = c.astype(np.float32)
    if not np.isfinite(c).all():
        raise StoreError(f"{p}: centroids contain NaN/inf")
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def agreed_centroids(ctx, path: str, dim: int, l: int, key: str = "assign") -> np.ndarray:
    """``load_centroids`` on every rank, rank 0 first: a bad file is one line on every rank
    (``DistContext.agree``), and the K x D array is read from disk, never broadcast (3 GB at
    K = 1M, D = 768) nor read twice on rank 0."""
    kept: dict = {}
    ctx.agree(lambda: kept.setdefault("c", load_centroids(path, dim, l, key)).shape)
    return kept["c"] if "c" in kept else load_centroids(path, dim, l, key)


class ExactTopL:
    """Exact top-l search against fixed unit-norm centers ``c`` (K x D float32), torch only."""

    def __init__(self, c: np.ndarray, l: int, device: torch.device | None = None, block_rows: int = 16384):
        self.l, self.block_rows = l, block_rows
        self.device = device or torch.device("cpu")
        c = np.ascontiguousarray(c, dtype=np.float32)
        k, d = c.shape
        self.tile_rows = tile_rows(k, self.device, block_rows)
        # padded to whole groups; padded columns are set to -inf after each GEMM
        self.group = GROUP if GROUP and k >= 4 * GROUP * l else 0
        kp = -(-k // self.group) * self.group if self.group else k
        ct = torch.zeros(d, kp)
        ct[:, :k] = torch.from_numpy(c).T
        self.ct, self.k = ct.to(self.device), k  # D x K_padded
        self._tile: torch.Tensor | None = None

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 N x l best first, sims float32 N x l) for unit rows ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out_i = np.empty((len(x), self.l), np.int64)
        out_s = np.empty((len(x), self.l), np.float32)
        cpu = self.device.type == "cpu"
        ti, ts = torch.from_numpy(out_i), torch.from_numpy(out_s)
        tile = self._tile
        if tile is None:
            tile = self._tile = torch.empty(self.tile_rows, self.ct.shape[1], device=self.device)
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


def tile_rows(k: int, device: torch.device, block_rows: int) -> int:
    if device.type == "cpu":
        return max(64, min(block_rows, CPU_TILE_BYTES * torch.get_num_threads() // (4 * k)))
    return block_rows


def label_rows(arr: np.ndarray, topk, block_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One part's (int32 labels, float32 sims, invalid rows) through any engine with
    ``search``/``l``: rows in blocks of ``block_rows``; NaN/inf/zero rows get -1 and 0."""
    n, l = len(arr), topk.l
    labels = np.full((n, l), -1, np.int32)
    sims = np.zeros((n, l), np.float32)
    bad = 0
    for s in range(0, n, block_rows):
        x, valid = clean_rows(arr[s:s + block_rows])
        bad += int((~valid).sum())
        if valid.any():
            i, v = topk.search(x[valid])
            labels[s:s + len(x)][valid] = i
            sims[s:s + len(x)][valid] = v
    return labels, sims, bad


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
