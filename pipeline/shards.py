"""Image-text shards in img2dataset's layout: ``00000.tar`` (per sample ``{key}.jpg|png``,
``{key}.txt``, ``{key}.json``) beside ``00000.parquet`` and ``00000_stats.json``.

One writer (``ShardWriter``) and one way to name inputs (``expand_shards``) for every stage.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from braceexpand import braceexpand

from pipeline import netpolicy
from pipeline.errors import StageError
from pipeline.io import atomic_path, atomic_write_json


class ShardSpecError(StageError, ValueError):
    exit_code = 2  # a shard spec that matches nothing is a setting to fix


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Input shards from a brace pattern (``/data/{00000..04095}.tar``), a list file (``.txt``,
    one shard per line), a directory (its ``*.tar``), or a list of any of those. ``pipe:`` and
    URL specs are passed through for webdataset to open, only where the run allows them
    (``check_url``; a refused list-file line is named by file and line number)."""
    if not isinstance(spec, str):
        return [s for item in spec for s in expand_shards(item)]
    if is_url(spec):
        return [check_url(s, "shard spec") for s in braceexpand(spec)]
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(x) for x in p.glob("*.tar"))
        if not shards:
            raise ShardSpecError(f"no .tar shards in directory {spec}")
        return shards
    if p.suffix == ".txt" and p.is_file():
        # Lines are taken as given (braces expanded): a listed shard that is missing becomes a
        # per-shard failure of the stage reading it, not an error that aborts the whole run.
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        return [check_url(s, f"{p}:{i + 1}") for i, ln in enumerate(lines)
                if ln and not ln.startswith("#") for s in braceexpand(ln)]
    shards = list(braceexpand(spec))
    missing = [s for s in shards if not os.path.exists(s)]
    if missing and len(missing) == len(shards):
        raise ShardSpecError(f"shard spec {spec!r} matches no file (first: {missing[0]})")
    return shards


def is_url(spec: str) -> bool:
    """A ``pipe:`` command or a URL: webdataset opens it itself, there is no local file to look at."""
    return spec.startswith("pipe:") or "://" in spec


def check_url(url: str, where: str) -> str:
    """``url`` if the run's policy lets it be opened (pipeline/netpolicy.py): webdataset runs a
    ``pipe:`` spec with a shell and fetches remote URLs, so a line of a data file must not do
    either unless the config says so."""
    if url.startswith("pipe:") and not netpolicy.pipe_allowed():
        raise ShardSpecError(f"{where}: {url[:80]!r} is a shell command (pipe:); refused unless "
                             f"run.allow_pipe=true")
    if netpolicy.is_remote(url) and not url.startswith("pipe:") and not netpolicy.remote_allowed():
        raise ShardSpecError(f"{where}: {url[:80]!r} is a remote URL; refused unless run.allow_remote=true")
    return url


def shard_stem(url: str) -> str:
    """``/data/00012.tar`` -> ``00012`` (the part id the embedding store uses)."""
    name = url.rstrip("/").split("/")[-1].split(" ")[-1]
    return name[:-4] if name.endswith(".tar") else name


class ShardWriter:
    """Writes one shard atomically: tar + parquet first (as temps), then ``_stats.json``, which
    marks the shard complete. A killed writer leaves no complete-looking partial shard."""

    def __init__(self, folder: str | os.PathLike, shard_id: int):
        self.folder = Path(folder)
        self.stem = f"{shard_id:05d}"
        self.rows: list[dict] = []
        self._tar_ctx = atomic_path(self.folder / f"{self.stem}.tar")
        self._tar_tmp = self._tar_ctx.__enter__()
        self._writer = wds.TarWriter(str(self._tar_tmp))

    @staticmethod
    def is_complete(folder: str | os.PathLike, shard_id: int) -> bool:
        return (Path(folder) / f"{shard_id:05d}_stats.json").exists()

    def write(self, key: str, image_bytes: bytes, ext: str, caption: str, meta: dict) -> None:
        meta = {"key": key, "caption": caption, **meta}
        self._writer.write({"__key__": key, ext: image_bytes, "txt": caption,
                            "json": json.dumps(meta).encode()})
        self.rows.append({**meta, "status": "success", "error_message": None})

    def add_failure(self, key: str, url: str, reason: str, meta: dict | None = None) -> None:
        self.rows.append({"key": key, "url": url, "caption": None, "status": "failed_to_decode",
                          "error_message": reason, **(meta or {})})

    def close(self, extra_stats: dict | None = None) -> dict:
        self._writer.close()
        self._tar_ctx.__exit__(None, None, None)
        ok = [r for r in self.rows if r["status"] == "success"]
        reasons: dict[str, int] = {}
        for r in self.rows:
            if r["status"] != "success":
                reasons[r["error_message"]] = reasons.get(r["error_message"], 0) + 1
        table = pa.Table.from_pylist(self.rows) if self.rows else pa.table({"key": pa.array([], pa.string())})
        with atomic_path(self.folder / f"{self.stem}.parquet") as tmp:
            pq.write_table(table, tmp)
        stats = {"count": len(self.rows), "successes": len(ok), "failed_to_decode": len(self.rows) - len(ok),
                 "status_dict": {"success": len(ok), **reasons}, **(extra_stats or {})}
        atomic_write_json(self.folder / f"{self.stem}_stats.json", stats)
        return stats


def encode_image(img, fmt: str = "jpg", quality: int = 90) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), fmt


class InlinePool:
    """``ProcessPoolExecutor``'s ``map`` in this process (workers = 1: no pickling, no fork)."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def map(self, fn, it, chunksize=1):
        return map(fn, it)
