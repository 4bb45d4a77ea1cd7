"""The on-disk contracts between stages: the embedding store and the label store.

Embedding store (clip-retrieval's layout, so LAION's published embeddings plug in unchanged)::

    store/img_emb/img_emb_{i}.npy        float16 (or float32) N_i x D, L2-normalized rows
    store/text_emb/text_emb_{i}.npy
    store/joint_emb/joint_emb_{i}.npy    (ours; UNICOM-style joint image+text features)
    store/metadata/metadata_{i}.parquet  key, caption, url, ... row-aligned with the arrays
    store/manifest.json                  (ours; optional for readers)

Label store (stage 2 -> stage 3), row-aligned with ``metadata_{i}.parquet``::

    labels/labels_{i}.npy   int32 N_i x l, nearest center first (-1: row had no valid embedding)
    labels/sims_{i}.npy     float16 N_i x l cosine similarities
    labels/manifest.json

``{i}`` is the part number, zero-padded or not: clip-retrieval's writer pads it to
``int(log10(partition_count)) + 1`` digits (``img_emb_00.npy`` once there are 10 or more parts, as
in LAION's released stores); we write it unpadded. Readers accept any padding (``part_file``), and
label files take the digits of the store part they label (``part_name``), so both stay aligned.
Metadata needs a ``key`` column (ours, img2dataset's) or clip-retrieval's ``image_path``.

Parts are written file by file atomically; ``metadata`` is written last, so a part whose metadata
file exists is complete. Readers never need the manifest.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io import atomic_path, atomic_save_npy, atomic_write_json, load_npy

log = logging.getLogger("mlcd.store")

KINDS = ("img", "text", "joint")
_PART_RE = re.compile(r"^(?:img|text|joint)_emb_(\d+)\.npy$")


class StoreError(InputError):
    pass


_MAX_DIGITS = 9


def part_file(folder: str | os.PathLike, prefix: str, part: int | str, suffix: str) -> Path:
    """``folder/{prefix}{part}{suffix}``: an existing file with the part number zero-padded to any
    width (a few stats, no listing), else the unpadded name (what we write). A ``str`` part is
    taken verbatim (the digits of an existing file, see ``part_name``)."""
    folder = Path(folder)
    if isinstance(part, str):
        return folder / f"{prefix}{part}{suffix}"
    plain = folder / f"{prefix}{part}{suffix}"
    if plain.exists():
        return plain
    for width in range(len(str(part)) + 1, _MAX_DIGITS + 1):
        p = folder / f"{prefix}{part:0{width}d}{suffix}"
        if p.exists():
            return p
    return plain


def emb_path(root: str | os.PathLike, kind: str, part: int | str) -> Path:
    return part_file(Path(root) / f"{kind}_emb", f"{kind}_emb_", part, ".npy")


def meta_path(root: str | os.PathLike, part: int | str) -> Path:
    return part_file(Path(root) / "metadata", "metadata_", part, ".parquet")


def part_name(root: str | os.PathLike, part: int) -> str:
    """The digits a store uses for ``part`` (``"03"`` in a padded store, else ``"3"``), so the
    label files written for it follow the store's naming."""
    return meta_path(root, part).name[len("metadata_"):-len(".parquet")]


def read_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a metadata part: ``key``, else clip-retrieval's ``image_path`` (the
    webdataset key, or a file path whose stem is the key)."""
    names = pq.read_schema(path).names
    if "key" in names:
        return [str(k) for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()]
    if "image_path" in names:
        return [Path(str(k)).stem if "/" in str(k) else str(k)
                for k in pq.read_table(path, columns=["image_path"]).column("image_path").to_pylist()]
    raise StoreError(f"{path}: no 'key' or 'image_path' column (has: {', '.join(names[:8])})")


class EmbeddingStore:
    """Reads a store; works on clip-retrieval / LAION stores that have no manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"embedding store {self.root} does not exist")
        self.kinds = [k for k in KINDS if (self.root / f"{k}_emb").is_dir()]
        if not self.kinds:
            raise StoreError(f"{self.root} has none of img_emb/, text_emb/, joint_emb/")

    def parts(self, kind: str) -> list[int]:
        self._check_kind(kind)
        ids = []
        for p in (self.root / f"{kind}_emb").iterdir():
            m = _PART_RE.match(p.name)
            if m and p.name.startswith(kind + "_"):
                ids.append(int(m.group(1)))
        return sorted(ids)

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise StoreError(f"{self.root} has no {kind}_emb/ (has: {', '.join(self.kinds)})")

    def load(self, kind: str, part: int, mmap: bool = True) -> np.ndarray:
        path = emb_path(self.root, kind, part)
        if not path.is_file():
            raise StoreError(f"missing part {path}")
        try:
            arr = load_npy(path, mmap=mmap)
        except Exception as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        if arr.ndim != 2:
            raise StoreError(f"{path}: expected a 2-D array, got shape {arr.shape}")
        return arr

    def check(self, kind: str) -> tuple[list[int], int, np.dtype, list[int]]:
        """(parts, dim, dtype, rows per part); one error naming the first inconsistent file."""
        parts = self.parts(kind)
        if not parts:
            raise StoreError(f"{self.root / (kind + '_emb')}: no parts")
        dim, dtype, counts = None, None, []
        for p in parts:
            a = self.load(kind, p)
            if dim is None:
                dim, dtype = a.shape[1], a.dtype
            elif a.shape[1] != dim or a.dtype != dtype:
                raise StoreError(f"{emb_path(self.root, kind, p)}: dim/dtype {a.shape[1]}/{a.dtype} "
                                 f"differs from part {parts[0]} ({dim}/{dtype})")
            counts.append(a.shape[0])
        assert dim is not None  # parts is not empty
        return parts, int(dim), np.dtype(dtype), counts

    def metadata(self, part: int, columns: list[str] | None = None) -> pa.Table:
        path = meta_path(self.root, part)
        if not path.is_file():
            raise StoreError(f"missing metadata {path}")
        return pq.read_table(path, columns=columns)

    def iter_blocks(self, kind: str, block_rows: int, parts: list[int] | None = None
                    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(part, row offset, float32 block) streamed with bounded memory (memory-mapped)."""
        for p in parts if parts is not None else self.parts(kind):
            a = self.load(kind, p, mmap=True)
            for s in range(0, a.shape[0], block_rows):
                yield p, s, np.asarray(a[s:s + block_rows], dtype=np.float32)


def part_complete(root: str | os.PathLike, part: int, kinds: list[str]) -> bool:
    return meta_path(root, part).is_file() and all(emb_path(root, k, part).is_file() for k in kinds)


def write_part(root: str | os.PathLike, part: int, embeddings: dict[str, np.ndarray],
               metadata: pa.Table, dtype=np.float16) -> None:
    """Writes one part: every array atomically, then the metadata (the completion marker)."""
    n = metadata.num_rows
    for kind, arr in embeddings.items():
        if kind not in KINDS:
            raise StoreError(f"unknown embedding kind {kind!r}")
        if arr.shape[0] != n:
            raise StoreError(f"part {part}: {kind} has {arr.shape[0]} rows, metadata {n}")
        atomic_save_npy(emb_path(root, kind, part), arr.astype(dtype, copy=False))
    with atomic_path(meta_path(root, part)) as tmp:
        pq.write_table(metadata, tmp)


# ---------------------------------------------------------------- label store

def labels_path(root: str | os.PathLike, part: int | str) -> Path:
    return part_file(root, "labels_", part, ".npy")


def sims_path(root: str | os.PathLike, part: int | str) -> Path:
    return part_file(root, "sims_", part, ".npy")


def write_labels(root: str | os.PathLike, part: int | str, labels: np.ndarray, sims: np.ndarray) -> None:
    """sims first, labels last: a part whose labels file exists is complete. Pass
    ``part_name(store, p)`` as ``part`` to follow the store's zero-padding."""
    if labels.shape != sims.shape or labels.ndim != 2:
        raise StoreError(f"labels {labels.shape} and sims {sims.shape} must be equal 2-D shapes")
    atomic_save_npy(sims_path(root, part), sims.astype(np.float16))
    atomic_save_npy(labels_path(root, part), labels.astype(np.int32))


class LabelStore:
    """Reads ``labels/``: per part int32 N x l labels (best first, -1 = none) and float16 sims."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"label store {self.root} does not exist")

    def parts(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := re.match(r"^labels_(\d+)\.npy$", p.name)))

    def load(self, part: int, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        lp = labels_path(self.root, part)
        if not lp.is_file():
            raise StoreError(f"missing labels {lp}")
        return load_npy(lp, mmap=mmap), load_npy(sims_path(self.root, part), mmap=mmap)


def settle_label_state(root: str | os.PathLike, state: dict, old: dict | None, overwrite: bool) -> None:
    """Labels on disk are reused only if they came from this exact ``state`` (centroids' hash, k,
    l, kind, engine): otherwise (or on overwrite) every part is dropped, then ``state.json`` is
    written. Stage 2b and fused stage 1 both label through this."""
    root = Path(root)
    if overwrite or (old is not None and old != state):
        if old is not None and old != state and not overwrite:
            log.warning("centroids, l, kind or engine changed since %s was written; relabeling every part", root)
        for p in list(root.glob("labels_*.npy")) + list(root.glob("sims_*.npy")):
            p.unlink()
        (root / "manifest.json").unlink(missing_ok=True)
    atomic_write_json(root / "state.json", state)
