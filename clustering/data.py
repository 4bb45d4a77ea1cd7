"""Reading the embedding store for clustering: validation, row validity, and the training sample.

The sample is drawn uniformly without replacement over all rows of the store, part by part:
per-part counts come from one multivariate hypergeometric draw (seeded, identical on every rank),
rows inside a part from a generator seeded by (seed, part). So the sample is the same whatever
the number of ranks, and only one part's chosen rows are in memory at a time (memory-mapped).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline.core import fs
from pipeline.core.provenance import parquet_file
from pipeline.core.store import EmbeddingStore, StoreError, emb_path, meta_path
from pipeline.core.topl import clean_rows  # one definition, shared with stage 1

log = logging.getLogger("mlcd.cluster")


@dataclass
class StoreInfo:
    store: EmbeddingStore
    kind: str
    parts: list[int]
    dim: int
    dtype: np.dtype
    counts: list[int]
    missing: list[int] = field(default_factory=list)     # gaps in the part numbering
    incomplete: list[int] = field(default_factory=list)  # embedding present, metadata absent

    @property
    def rows(self) -> int:
        return int(sum(self.counts))


def open_store(root: str, kind: str, need_metadata: bool = False,
               skip_incomplete: bool = False) -> StoreInfo:
    """Checks every part's header (dims, dtypes; one error naming the first odd file) and that
    metadata row counts match. Gaps in part numbering are reported, not fatal (a failed shard)."""
    store = EmbeddingStore(root)
    parts, dim, dtype, counts = store.check(kind)
    if dtype.kind != "f":
        raise StoreError(f"{emb_path(root, kind, parts[0])}: dtype {dtype} is not floating point")
    missing = sorted(set(range(parts[-1] + 1)) - set(parts))
    if missing:
        log.warning("%s: %d part number(s) missing from %s_emb/ (first: %d)", root, len(missing),
                    kind, missing[0])
    incomplete, keep_parts, keep_counts = [], [], []
    for p, n in zip(parts, counts):
        mp = meta_path(root, p)
        if not fs.isfile(mp):
            if need_metadata and not skip_incomplete:
                raise StoreError(f"missing metadata {mp} for {emb_path(root, kind, p)} (incomplete part; "
                                 f"set skip_incomplete=true to skip it)")
            if need_metadata:
                incomplete.append(p)
                continue
        elif need_metadata:
            m = parquet_file(mp).metadata.num_rows
            if m != n:
                raise StoreError(f"{mp}: {m} rows but {emb_path(root, kind, p)} has {n}")
        keep_parts.append(p)
        keep_counts.append(n)
    if incomplete:
        log.warning("skipping %d incomplete part(s) (no metadata): %s", len(incomplete), incomplete[:10])
    if not keep_parts:
        raise StoreError(f"{root}: no complete parts")
    return StoreInfo(store, kind, keep_parts, dim, dtype, keep_counts, missing, incomplete)


def sample_counts(counts: list[int], n: int, seed: int) -> np.ndarray:
    """How many sample rows each part contributes (uniform sampling without replacement)."""
    total = int(sum(counts))
    if n >= total:
        return np.asarray(counts, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5A3D])
    return rng.multivariate_hypergeometric(np.asarray(counts, dtype=np.int64), n, method="marginals")


def part_sample_rows(n_rows: int, take: int, seed: int, part: int) -> np.ndarray:
    if take >= n_rows:
        return np.arange(n_rows)
    rng = np.random.default_rng([seed, 0x5A3D, part])
    return np.sort(rng.choice(n_rows, size=take, replace=False))


def draw_sample(info: StoreInfo, n: int, seed: int, parts: list[int] | None = None
                ) -> tuple[np.ndarray, dict[int, int], int]:
    """(float32 unit rows, {part: valid rows taken}, invalid rows dropped) for ``parts`` (default
    all; a rank passes its own). Rows are in (part, row) order."""
    take = dict(zip(info.parts, sample_counts(info.counts, n, seed).tolist()))
    n_rows = dict(zip(info.parts, info.counts))
    chunks, per_part, bad = [], {}, 0
    for p in info.parts if parts is None else parts:
        rows = part_sample_rows(n_rows[p], take[p], seed, p)
        if len(rows) == 0:
            per_part[p] = 0
            continue
        arr = info.store.load(info.kind, p, mmap=True)
        x, valid = clean_rows(arr[rows])
        bad += int((~valid).sum())
        chunks.append(x[valid])
        per_part[p] = int(valid.sum())
    x = np.concatenate(chunks) if chunks else np.zeros((0, info.dim), np.float32)
    return np.ascontiguousarray(x), per_part, bad
