"""`mlcd data shards SRC OUT`: an image folder or image list -> img2dataset-layout shards.

    python -m pipeline.make_shards SRC OUT [--per-shard N] [--workers W] [--quality Q]

SRC is read by pipeline/core/sources.py (an image folder, class sub-folders giving ``cls``, or a
.txt/.csv/.parquet list of image files). Shard ``i`` holds files ``i*N .. (i+1)*N`` in that order:
``{i:05d}.tar`` (``{key}.jpg``, ``{key}.txt`` caption, ``{key}.json`` with ``url``/``path``/``cls``),
``{i:05d}.parquet`` (one row per file, failures with their reason) and ``{i:05d}_stats.json``
(``status_dict``: successes and every failure reason counted), written by ``ShardWriter``: the
stats file is written last and marks the shard complete. Every picture is decoded by
pipeline/core/images.py (the repairs and caps every stage applies) and written as JPEG, so
training streams exactly what stage 1 would decode; a file that cannot be read is counted by
reason (``file_missing``, ``not_an_image``, ``extreme_aspect``, ...), never fatal.

Resumable: a complete shard made from the same files (``source_part`` in its stats) is skipped on
rerun; a half-written one (no stats) is rewritten whole; one made from other files (SRC changed:
files added or removed before it) is refused in one line (exit 1) rather than mixed in. With class
folders, ``classes.json`` is written beside the shards (eval's probe-set layout).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.core.entry import StageError, disk_full, report
from pipeline.core.images import MAX_ASPECT, MAX_PIXELS, load_rgb
from pipeline.core.io import atomic_write_json, clean_stale_tmp, read_json
from pipeline.core.shards import InlinePool, ShardWriter, encode_image
from pipeline.core.sources import (
    SourceError,
    expand_input,
    file_sample,
    is_file_source,
    list_files,
    part_items,
)

log = logging.getLogger("mlcd.shards")


class ShardsError(StageError):
    """OUT holds a shard made from other files: exit 1."""
    label = "shards error"


def write_shard(job: tuple[str, int, str, int, float]) -> dict:
    """One shard from one virtual part of the source (a worker process's whole job)."""
    out, i, spec, quality, max_aspect = job
    w = ShardWriter(out, i)
    for it in part_items(spec):
        s = file_sample(it)
        meta = {"url": it.path, **({"cls": it.cls} if it.cls is not None else {})}
        if "__skip__" in s:
            w.add_failure(it.key, it.path, s["__skip__"], meta)
            continue
        raw = next(v for k, v in s.items() if k not in ("__key__", "txt", "json"))
        img, why = load_rgb(raw, MAX_PIXELS, 0, max_aspect)
        if img is None:
            w.add_failure(it.key, it.path, why, meta)
            continue
        caption = s["txt"].decode("utf-8", errors="replace") if "txt" in s else ""
        data, ext = encode_image(img, "jpg", quality)
        w.write(it.key, data, ext, " ".join(caption.split()), meta)
    return w.close({"source_part": spec})


def _done(out: Path, i: int, spec: str) -> bool:
    """Shard i is complete and was made from ``spec``'s files; refused if from other files."""
    if not ShardWriter.is_complete(out, i):
        return False
    stats = out / f"{i:05d}_stats.json"
    was = read_json(stats).get("source_part")
    if was != spec:
        raise ShardsError(f"{stats}: shard {i} was made from {was}, not {spec} (the source changed); "
                          f"write to an empty folder")
    return True


def make_shards(src: str, out: str | Path, per_shard: int = 1000, workers: int = 1, quality: int = 95,
                max_aspect: float = MAX_ASPECT) -> dict:
    if not is_file_source(src):
        raise SourceError(f"{src}: not an image folder or an image list (.txt/.csv/.parquet); "
                          f"webdataset shards need no conversion")
    out = Path(out)
    parts = expand_input(src, per_shard)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)  # temps of a killed writer: its shard has no stats, so it is redone
    todo = [(str(out), i, spec, quality, max_aspect) for i, spec in enumerate(parts) if not _done(out, i, spec)]
    listing = list_files(os.path.abspath(src))  # cached by expand_input
    if listing.classes:
        atomic_write_json(out / "classes.json", list(listing.classes))
    log.info("%s: %d files, %d shards, %d to write -> %s", src, len(listing.items), len(parts), len(todo), out)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else InlinePool()
    with pool:
        for stats in pool.map(write_shard, todo):
            log.info("shard %s: %d written, %d failed", stats["source_part"].rpartition("#")[2],
                     stats["successes"], stats["failed_to_decode"])
    totals: dict = {"shards": len(parts), "written": len(todo), "count": 0, "successes": 0, "status_dict": {}}
    for i in range(len(parts)):
        st = read_json(out / f"{i:05d}_stats.json")
        totals["count"] += st["count"]
        totals["successes"] += st["successes"]
        for k, v in st["status_dict"].items():
            totals["status_dict"][k] = totals["status_dict"].get(k, 0) + v
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd data shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="image folder, or a .txt/.csv/.parquet list of image files")
    ap.add_argument("out", help="output folder of shards")
    ap.add_argument("--per-shard", type=int, default=1000, help="files per shard (default 1000)")
    ap.add_argument("--workers", type=int, default=1, help="processes, one shard each (default 1)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    ap.add_argument("--max-aspect", type=float, default=MAX_ASPECT, help="longer/shorter side cap (0: none)")
    args = ap.parse_args(argv)
    if args.per_shard < 1 or args.workers < 1 or not 1 <= args.quality <= 100:
        ap.error("--per-shard and --workers must be >= 1, --quality 1..100")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        totals = make_shards(args.src, args.out, args.per_shard, args.workers, args.quality, args.max_aspect)
    except StageError as e:
        return report(e) or 1
    except OSError as e:
        full = disk_full(e, args.out)
        if full is None:
            raise
        return report(full) or 1
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
