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
    labels/labels_{i}.json  what the part was made from (keys digest, centers; pipeline/core/provenance.py)
    labels/manifest.json

``{i}`` is the part number. clip-retrieval's writer zero-pads it to ``int(log10(count)) + 1``
digits, ``count`` being the run's number of parts (``img_emb_00.npy`` .. ``img_emb_11.npy`` for 12
parts, unpadded below 10), and its readers pair ``img_emb/`` and ``metadata/`` files by sorted
name: unpadded names would sort ``10`` before ``2``. We write the same width (``part_width``; the
embed stage knows its count up front and states it in ``manifest.json`` as ``part_digits``).
Readers accept any padding (``part_file``) but refuse two files with one number
(``part_numbers``), and label files take the digits of the store part they label
(``part_name``), so both stay aligned.
Metadata needs a ``key`` column (ours, img2dataset's) or clip-retrieval's ``image_path``; we write
both (``image_path`` = the key, as clip-retrieval's webdataset reader names a sample), and
``shard`` as the run was given it (an absolute path or a URL).

``root`` may be a URL (``s3://bucket/run/store``; ``pipeline/core/fs.py``): every file is then one
upload under its final name, and a part is done only once its marker (the metadata file; a label
part's record) exists, as on a local disk.

Parts are written file by file atomically; ``metadata`` is written last, so a part whose metadata
file exists is complete (its schema carries the part's record: pipeline/core/provenance.py). Readers
never need the manifest.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import fs
from pipeline.core.errors import InputError
from pipeline.core.io import atomic_path, atomic_save_npy, atomic_write_json, load_npy, read_json

log = logging.getLogger("mlcd.store")

KINDS = ("img", "text", "joint")


class StoreError(InputError):
    pass


def part_numbers(folder: str | os.PathLike, prefix: str, suffix: str) -> list[int]:
    """Sorted part numbers of ``folder/{prefix}{digits}{suffix}``. Two files with one number
    (``img_emb_1.npy`` beside ``img_emb_01.npy``) are refused by name: a reader would take one
    of them and count the part twice or pick the wrong one."""
    pat = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")
    seen: dict[int, str] = {}
    for name in fs.ls(folder):
        if m := pat.match(name):
            n = int(m.group(1))
            if n in seen:
                a, b = sorted((seen[n], name))
                raise StoreError(f"{folder}: {a} and {b} both hold part {n} (one part number, two "
                                 f"files); remove the one that does not belong")
            seen[n] = name
    return sorted(seen)


_MAX_DIGITS = 9


def part_width(count: int) -> int:
    """clip-retrieval's zero-padding for a run of ``count`` parts: 1 digit below 10 parts, 2 up
    to 99, ..."""
    return int(math.log10(max(count, 1))) + 1


def part_file(folder: str | os.PathLike, prefix: str, part: int | str, suffix: str,
              width: int | None = None) -> Path:
    """``folder/{prefix}{part}{suffix}``: with ``width``, the name a writer uses (zero-padded to
    it); else an existing file with the part number zero-padded to any width (local: a few
    stats; a URL: one listing), else the unpadded name. A ``str`` part is taken verbatim (the
    digits of an existing file, see ``part_name``). A URL comes back as a ``Path`` too (pathlib
    folds its ``//``; ``fs`` takes it back): test it with ``fs``, not ``Path.is_file``."""
    folder = Path(folder)
    if isinstance(part, str):
        return folder / f"{prefix}{part}{suffix}"
    if width is not None:
        return folder / f"{prefix}{part:0{width}d}{suffix}"
    if (loc := fs.local(folder)) is not None:
        folder = Path(loc)
    plain = folder / f"{prefix}{part}{suffix}"
    if fs.is_remote(folder):
        pat = re.compile(rf"^{re.escape(prefix)}0*{part}{re.escape(suffix)}$" if part else
                         rf"^{re.escape(prefix)}0+{re.escape(suffix)}$")
        names = [n for n in fs.ls(folder) if pat.match(n)]
        return folder / names[0] if names else plain
    if plain.exists():
        return plain
    for width in range(len(str(part)) + 1, _MAX_DIGITS + 1):
        p = folder / f"{prefix}{part:0{width}d}{suffix}"
        if p.exists():
            return p
    return plain


def emb_path(root: str | os.PathLike, kind: str, part: int | str, width: int | None = None) -> Path:
    return part_file(Path(root) / f"{kind}_emb", f"{kind}_emb_", part, ".npy", width)


def meta_path(root: str | os.PathLike, part: int | str, width: int | None = None) -> Path:
    return part_file(Path(root) / "metadata", "metadata_", part, ".parquet", width)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A parquet file, local or a URL (read whole: metadata parts are small)."""
    if fs.is_remote(path):
        with fs.open_read(path) as f:
            return pq.read_table(f, columns=columns)
    return pq.read_table(fs.local(path), columns=columns)


def read_parquet_schema(path: str | os.PathLike) -> pa.Schema:
    if fs.is_remote(path):
        with fs.open_read(path) as f:
            return pq.read_schema(f)
    return pq.read_schema(fs.local(path))


def parquet_rows(path: str | os.PathLike) -> int:
    """Rows of a parquet file from its footer (no data read), local or a URL."""
    if fs.is_remote(path):
        with fs.open_read(path) as f:
            return pq.read_metadata(f).num_rows
    return pq.read_metadata(fs.local(path)).num_rows


def part_name(root: str | os.PathLike, part: int) -> str:
    """The digits a store uses for ``part`` (``"03"`` in a padded store, else ``"3"``), so the
    label files written for it follow the store's naming."""
    return meta_path(root, part).name[len("metadata_"):-len(".parquet")]


def read_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a metadata part: ``key``, else clip-retrieval's ``image_path`` (the
    webdataset key, or a file path whose stem is the key)."""
    names = read_parquet_schema(path).names
    if "key" in names:
        return [str(k) for k in read_parquet(path, columns=["key"]).column("key").to_pylist()]
    if "image_path" in names:
        return [Path(str(k)).stem if "/" in str(k) else str(k)
                for k in read_parquet(path, columns=["image_path"]).column("image_path").to_pylist()]
    raise StoreError(f"{path}: no 'key' or 'image_path' column (has: {', '.join(names[:8])})")


class EmbeddingStore:
    """Reads a store; works on clip-retrieval / LAION stores that have no manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not fs.isdir(fs.check(root, "embedding store")):
            raise StoreError(f"embedding store {fs.url_of(root)} does not exist")
        found = set(fs.ls(root))
        self.kinds = [k for k in KINDS if f"{k}_emb" in found and fs.isdir(self.root / f"{k}_emb")]
        if not self.kinds:
            raise StoreError(f"{self.root} has none of img_emb/, text_emb/, joint_emb/")

    def parts(self, kind: str) -> list[int]:
        self._check_kind(kind)
        return part_numbers(self.root / f"{kind}_emb", f"{kind}_emb_", ".npy")

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise StoreError(f"{self.root} has no {kind}_emb/ (has: {', '.join(self.kinds)})")

    def load(self, kind: str, part: int, mmap: bool = True) -> np.ndarray:
        path = emb_path(self.root, kind, part)
        if not fs.isfile(path):
            raise StoreError(f"missing part {fs.url_of(path)}")
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
        if fs.isdir(self.root / "metadata"):
            part_numbers(self.root / "metadata", "metadata_", ".parquet")  # refuses duplicates
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
        if not fs.isfile(path):
            raise StoreError(f"missing metadata {fs.url_of(path)}")
        return read_parquet(path, columns=columns)

    def iter_blocks(self, kind: str, block_rows: int, parts: list[int] | None = None
                    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(part, row offset, float32 block) streamed with bounded memory (memory-mapped)."""
        for p in parts if parts is not None else self.parts(kind):
            a = self.load(kind, p, mmap=True)
            for s in range(0, a.shape[0], block_rows):
                yield p, s, np.asarray(a[s:s + block_rows], dtype=np.float32)


def part_complete(root: str | os.PathLike, part: int, kinds: list[str]) -> bool:
    return fs.isfile(meta_path(root, part)) and all(fs.isfile(emb_path(root, k, part)) for k in kinds)


def write_part(root: str | os.PathLike, part: int, embeddings: dict[str, np.ndarray],
               metadata: pa.Table, dtype=np.float16, width: int | None = None) -> None:
    """Writes one part: every array atomically, then the metadata (the completion marker).
    ``width``: the part number's zero-padding (``part_width`` of the run's part count); a
    metadata table with ``key`` and no ``image_path`` gets clip-retrieval's column beside it."""
    n = metadata.num_rows
    if "key" in metadata.column_names and "image_path" not in metadata.column_names:
        metadata = metadata.add_column(metadata.column_names.index("key") + 1, "image_path",
                                       metadata.column("key"))
    for kind, arr in embeddings.items():
        if kind not in KINDS:
            raise StoreError(f"unknown embedding kind {kind!r}")
        if arr.shape[0] != n:
            raise StoreError(f"part {part}: {kind} has {arr.shape[0]} rows, metadata {n}")
        atomic_save_npy(emb_path(root, kind, part, width), arr.astype(dtype, copy=False))
    with atomic_path(meta_path(root, part, width)) as tmp:
        pq.write_table(metadata, tmp)


# ---------------------------------------------------------------- label store

def labels_path(root: str | os.PathLike, part: int | str) -> Path:
    return part_file(root, "labels_", part, ".npy")


def sims_path(root: str | os.PathLike, part: int | str) -> Path:
    return part_file(root, "sims_", part, ".npy")


def record_path(root: str | os.PathLike, part: int | str) -> Path:
    """``labels_{i}.json``: what label part ``i`` was made from (pipeline/core/provenance.py)."""
    return part_file(root, "labels_", part, ".json")


def read_label_record(root: str | os.PathLike, part: int | str) -> dict | None:
    """The part's record, or None (written before records were kept, or not finished)."""
    p = record_path(root, part)
    if not fs.isfile(p):
        return None
    try:
        rec = read_json(p)
    except (OSError, ValueError) as e:
        raise StoreError(f"{fs.url_of(p)}: unreadable label record ({e})") from None
    return rec if isinstance(rec, dict) else None


def write_labels(root: str | os.PathLike, part: int | str, labels: np.ndarray, sims: np.ndarray,
                 record: dict | None = None) -> None:
    """sims, labels, then the record (``labels_{i}.json``), each atomic: a part whose record
    exists is complete (without ``record``: whose labels file exists, the old rule). Pass
    ``part_name(store, p)`` as ``part`` to follow the store's zero-padding."""
    if labels.shape != sims.shape or labels.ndim != 2:
        raise StoreError(f"labels {labels.shape} and sims {sims.shape} must be equal 2-D shapes")
    fs.rm(record_path(root, part))  # a stale record must not outlive its labels
    atomic_save_npy(sims_path(root, part), sims.astype(np.float16))
    atomic_save_npy(labels_path(root, part), labels.astype(np.int32))
    if record is not None:
        atomic_write_json(record_path(root, part), record)


class LabelStore:
    """Reads ``labels/``: per part int32 N x l labels (best first, -1 = none) and float16 sims."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not fs.isdir(fs.check(root, "label store")):
            raise StoreError(f"label store {fs.url_of(root)} does not exist")

    def parts(self) -> list[int]:
        return part_numbers(self.root, "labels_", ".npy")

    def load(self, part: int, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        lp = labels_path(self.root, part)
        if not fs.isfile(lp):
            raise StoreError(f"missing labels {fs.url_of(lp)}")
        return load_npy(lp, mmap=mmap), load_npy(sims_path(self.root, part), mmap=mmap)


def settle_label_state(root: str | os.PathLike, state: dict, old: dict | None, overwrite: bool) -> None:
    """Labels on disk are reused only if they came from this exact ``state`` (centroids' hash, k,
    l, kind, engine): otherwise (or on overwrite) every part is dropped, then ``state.json`` is
    written. Stage 2b and fused stage 1 both label through this."""
    root = Path(root)
    if overwrite or (old is not None and old != state):
        if old is not None and old != state and not overwrite:
            log.warning("centroids, l, kind or engine changed since %s was written; relabeling every part", root)
        part = re.compile(r"^(labels_\d+\.(npy|json)|sims_\d+\.npy)$")
        for name in fs.ls(root):
            if part.match(name):
                fs.rm(root / name)
        fs.rm(root / "manifest.json")
    atomic_write_json(root / "state.json", state)
