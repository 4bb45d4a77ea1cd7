"""What each part was made from: recorded when the part is written, checked on resume and downstream.

Embedding-store part ``i`` (stage 1): the record is the ``mlcd_part`` JSON in the schema metadata
of ``metadata_{i}.parquet``, the part's completion marker, so record and part appear together
(one atomic rename): ``shard`` (the spec as given), ``shard_size`` and ``shard_mtime_ns`` (a
local file; a ``pipe:``/URL shard is known by its string alone), ``encoder_sha256`` (the encoder
config) and ``reader_sha256`` (the decode settings that change a part's rows). Size + mtime, not a
digest of the shard: checking a digest on every resume would read every finished shard again
(terabytes at LAION scale), while a rewritten shard (img2dataset rerun, another copy) changes its
mtime. Shards moved to another folder match by file name and size; a copy that lost its mtime
(``cp`` without ``-p``) is embedded again by stage 1 and warned about by training.

Label part ``i`` (stage 2b, fused stage 1, region labels): ``labels_{i}.json`` beside
``labels_{i}.npy``, written after it (``pipeline.core.store.write_labels``; a part is done only when its
record exists): ``keys_sha256``, an order-sensitive digest of the ``key`` column of the metadata
part it labels (rows permuted or another store's part: another digest), and ``centroids_fp``, the
fingerprint of the centers file (``centroids_fingerprint``).

Folders written before records were kept still read: the checks warn once, naming how to refresh.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PART_META_KEY = b"mlcd_part"  # parquet schema metadata of an embedding part: its counts and record
FP_BLOCK = 1 << 16            # centroids fingerprint: bytes per sampled block
FP_BLOCKS = 64                # blocks sampled evenly over the file (plus the last one)
FP_FULL_BELOW = 64 << 20      # smaller files are hashed whole


def digest(obj) -> str:
    """sha256 of a config section (canonical JSON)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_FP_CACHE: dict[tuple, str] = {}


def centroids_fingerprint(path: str | os.PathLike) -> str:
    """``_fingerprint`` once per (file, size, mtime) in this process."""
    from pipeline.core import fs
    if fs.is_remote(path):  # no mtime to key the cache on: fingerprinted each time (~4 MiB read)
        return _fingerprint(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FP_CACHE:
        _FP_CACHE[key] = _fingerprint(path)
    return _FP_CACHE[key]


def _fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the file size, the first block (the npy header: shape, dtype) and 64 blocks of
    64 KiB spread evenly to the end: ~4 MiB read whatever the size. Measured on K = 1M x 768 fp32
    (3.07 GB, in the page cache; the loaded 2-core CPU box): 0.05-0.08 s, against 48 s for a
    sha256 of the whole file, so training checks it at start-up for free. It tells apart centers of different k-means runs (every row differs);
    an edit of a few rows between sampled blocks is not seen. Files under 64 MiB are hashed whole."""
    from pipeline.core import fs
    size = fs.size(path)
    h = hashlib.sha256(f"size={size};".encode())
    with fs.open_read(path) as f:
        if size <= FP_FULL_BELOW:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        step = (size - FP_BLOCK) // FP_BLOCKS
        for off in [i * step for i in range(FP_BLOCKS)] + [size - FP_BLOCK]:
            f.seek(off)
            h.update(f.read(FP_BLOCK))
    return f"sampled{FP_BLOCKS}x{FP_BLOCK}:" + h.hexdigest()


def keys_digest_of(keys: list[str]) -> str:
    """The digest of a key sequence (as ``keys_digest`` computes it from the parquet column)."""
    data = [str(k).encode() for k in keys]
    h = hashlib.sha256(np.asarray([len(b) for b in data], dtype="<i8").tobytes())
    h.update(b"".join(data))
    return h.hexdigest()


def keys_digest(meta: str | os.PathLike) -> str:
    """sha256 of a metadata part's sample keys in row order (``pipeline.core.store.read_keys``' keys):
    the key lengths (int64), then their UTF-8 bytes. Vectorized on the ``key`` column (no Python
    string per row). A 10k-row part: ~8 ms to read the column + 0.7 ms to hash it, measured on
    the loaded 2-core CPU box (the Python-list path took twice as long in total)."""
    from pipeline.core.store import read_keys
    f = parquet_file(meta)  # opened once: the schema and the column
    if "key" not in f.schema_arrow.names:
        return keys_digest_of(read_keys(meta))  # clip-retrieval's image_path
    col = f.read(columns=["key"]).column("key")
    arr = pc.fill_null(pc.cast(col, pa.large_string()), "None").combine_chunks()
    if len(arr) == 0:
        return keys_digest_of([])
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    h = hashlib.sha256(np.diff(off).astype("<i8").tobytes())
    h.update(memoryview(arr.buffers()[2])[off[0]:off[-1]] if arr.buffers()[2] is not None else b"")
    return h.hexdigest()


def parquet_file(meta: str | os.PathLike) -> pq.ParquetFile:
    """A metadata part, local or a URL (read whole into memory: parts are small)."""
    from pipeline.core import fs
    if fs.is_remote(meta):
        return pq.ParquetFile(io.BytesIO(fs.read_bytes(meta)))
    return pq.ParquetFile(fs.local(meta))


# ---------------------------------------------------------------- embedding parts

def shard_source(url: str) -> dict:
    """The identity of a shard as recorded for its part: the spec, and size/mtime of a local file."""
    rec: dict = {"shard": url}
    if url.startswith("files:"):  # a virtual part of an image folder/list (pipeline/core/sources.py)
        from pipeline.core.sources import source_stat
        rec.update(source_stat(url))
    elif os.path.isfile(url):
        st = os.stat(url)
        rec.update(shard_size=st.st_size, shard_mtime_ns=st.st_mtime_ns)
    return rec


def part_record(meta: str | os.PathLike) -> dict:
    """An embedding part's ``mlcd_part`` JSON ({} for a store written by clip-retrieval). Stores of
    ours from before this schema key still name their shard in the ``shard`` column."""
    f = parquet_file(meta)
    md = f.schema_arrow.metadata or {}
    if PART_META_KEY in md:
        return json.loads(md[PART_META_KEY])
    if "shard" in f.schema_arrow.names and f.metadata.num_rows:
        return {"shard": str(f.read_row_group(0, columns=["shard"]).column(0)[0])}
    return {}


def has_source(rec: dict) -> bool:
    return "encoder_sha256" in rec


def shard_mismatch(rec: dict, url: str) -> tuple[str, str] | None:
    """(kind, why) part ``rec`` was not made from shard ``url`` as it is now, None if it was.
    kind "other": another shard (the list changed); "size" / "mtime": this shard, rewritten since
    (or copied without its mtime). Local paths match by real path, or by file name + size (a store
    moved with its shards)."""
    was = rec.get("shard")
    if was is None:
        return None
    now = shard_source(url)
    if was != url and not (os.path.isfile(url) and os.path.isfile(was)
                           and os.path.realpath(was) == os.path.realpath(url)):
        moved = Path(was).name == Path(url).name and rec.get("shard_size", -1) == now.get("shard_size")
        if not moved:
            return "other", f"was made from {was}, not {url}"
    if "shard_size" in rec and "shard_size" in now:
        if rec["shard_size"] != now["shard_size"]:
            return "size", f"was made from {url} at {rec['shard_size']} bytes, it has {now['shard_size']} now"
        if rec.get("shard_mtime_ns") != now["shard_mtime_ns"]:
            return "mtime", f"was made from {url} before it was modified (mtime differs)"
    return None


# ---------------------------------------------------------------- label parts

def label_record(keys_sha256: str, rows: int, centroids_fp: str | None, **extra) -> dict:
    return {"keys_sha256": keys_sha256, "rows": rows, "centroids_fp": centroids_fp, **extra}


def label_mismatch(rec: dict | None, keys_sha256: str, centroids_fp: str | None) -> str | None:
    """Why a label part's record does not fit this metadata part / these centers (None: it does,
    or there is no record: the caller warns about those)."""
    if rec is None:
        return None
    if rec.get("keys_sha256") != keys_sha256:
        return (f"keys differ (sha256 {str(rec.get('keys_sha256'))[:12]} recorded, "
                f"{keys_sha256[:12]} now: labels of another store, or rows reordered)")
    if centroids_fp is not None and rec.get("centroids_fp") not in (None, centroids_fp):
        return (f"assigned with other centers (fingerprint {str(rec.get('centroids_fp'))[-12:]} "
                f"recorded, {centroids_fp[-12:]} now)")
    return None
