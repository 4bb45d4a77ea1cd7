"""Stage 1b: image shards + candidate boxes -> region embeddings in the embedding-store layout (RICE).

    python -m pipeline.regions --config configs/rice_demo.yaml [regions.ocr=none ...]
    torchrun --nproc_per_node 8 -m pipeline.regions --config ...

Regions of an image come from two sources, both optional:
- ``regions.boxes``: ``file`` reads ``{boxes_dir}/{shard stem}.parquet`` in the external box
  format (``key``, ``boxes`` [[x0, y0, x1, y1], ...] in stored-image pixels, ``kind`` "object" |
  "ocr", optional ``text``), which any detector or SAM run can write (``mlcd data rice`` writes
  its object boxes there). ``components`` is a built-in offline source for tests and plain-
  background images: connected components of the pixels that differ from the background colour
  (the median of the image border) by more than ``components_threshold``, pieces closer than
  ``components_close`` px merged. Its limits: touching objects come out as one region, a drawing
  whose parts lie further apart comes out as several, words are found as "object" regions too,
  and on photos (no plain background) it finds nothing useful. ``none``: OCR regions only.
- ``regions.ocr``: ``tesseract`` (Debian ``tesseract-ocr`` + ``tesseract-ocr-eng`` through
  pytesseract) adds word boxes with their text; the image is upscaled ``ocr_scale`` times first
  (Tesseract wants ~20 px letters) and a DataLoader worker sends a whole batch of images to one
  Tesseract process (a list file: ~5x faster than a process per image). Words below
  ``ocr_min_conf``, without a letter/digit or shorter than ``ocr_min_chars`` are dropped, counted
  by reason. A box file that already holds OCR rows wants ``ocr: none`` (else words come twice).

A box is kept if finite, non-empty, inside the image (clipped to it) and its shorter side is at
least ``min_edge`` px (``ocr_min_edge`` for words: text lines are thin; full-size web images
call for a far larger ``min_edge``, e.g. 128 px, than the demo's 128 px scenes allow). Each kept
region is cropped (``crop: square``: the square on the box's centre with the box's longer side,
so a wide word is not cut by the encoder's centre crop, with some context, neighbours included;
area outside the image white; ``box``: the box itself, which the encoder's centre crop trims), decoded by pipeline/core/images.py as in stage 1, preprocessed and embedded with the
stage-1 encoder (``regions.encoder``, the same ``EncoderConfig`` as ``embed.encoder``), batched.

Output (part i = shard i, pipeline/core/store.py's writers, so stage 2 reads it unchanged)::

    {out_dir}/img_emb/img_emb_{i}.npy          N_i x D, L2-normalized
    {out_dir}/metadata/metadata_{i}.parquet    key (f"{image_key}.r{j}"), image_key, x0, y0, x1, y1,
                                               img_w, img_h, kind, text, source, conf, shard
    {out_dir}/stats.json                       regions kept by kind, skipped by reason, per part

Ranks take unfinished parts round-robin (as stage 1); each part is written atomically with its
counts in the metadata's schema, metadata last, so a rerun after a kill redoes only absent parts.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core import fs
from pipeline.core.config import RESUMABLE, ConfigError, RunConfig, check, prepare_out_dir, to_dict
from pipeline.core.dist import DistContext
from pipeline.core.entry import StageError, stage_cli, stage_main
from pipeline.core.guard import die_with_parent_fn
from pipeline.core.images import IMAGE_EXTS, MAX_PIXELS, image_bytes, load_rgb
from pipeline.core.io import atomic_write_json, clean_stale_tmp
from pipeline.core.shards import ShardPolicyError, ShardSpecError, expand_shards, read_samples, shard_stem
from pipeline.core.store import part_complete, read_parquet, read_parquet_schema, write_part
from pipeline.core.tracking import Tracker, progress
from pipeline.embed import PART_META_KEY, _expected_rows, part_info
from pipeline.encoders import EncoderConfig, build_encoder

log = logging.getLogger("mlcd.regions")
KINDS = ("object", "ocr")
BOX_COLUMNS = ("key", "boxes", "kind")  # + optional "text": the external box format


@dataclass
class RegionsConfig:
    input: str = "${run.out_dir}/data/rice/train"   # shards, as embed.input
    out_dir: str = "${run.out_dir}/regions/store"
    boxes: str = "file"                    # file | components | none
    boxes_dir: str = "${run.out_dir}/data/rice/boxes"  # boxes=file: {shard stem}.parquet per shard
    ocr: str = "tesseract"                 # tesseract | none
    ocr_lang: str = "eng"
    ocr_min_conf: float = 70.0             # Tesseract word confidence (0-100)
    ocr_min_chars: int = 2                 # shorter words are dropped (single letters: mostly clip-art noise)
    ocr_scale: int = 2                     # upscale before OCR (small scenes: letters ~10 px)
    ocr_psm: int = 11                      # page segmentation: 11 = sparse text, any order
    min_edge: int = 16                     # shorter side of a kept object region, stored px
    ocr_min_edge: int = 8                  # ... of a kept word
    components_threshold: int = 32         # boxes=components: colour distance from background
    components_close: int = 2              # boxes=components: pieces this close (px) merge
    crop: str = "square"                   # square | box
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dtype: str = "float16"
    batch_size: int = 64                   # crops per encoder call (also images per OCR call)
    workers: int = field(default=2, metadata=RESUMABLE)  # DataLoader workers per rank: decode, OCR, crop
    prefetch_factor: int = field(default=2, metadata=RESUMABLE)
    max_pixels: int = MAX_PIXELS
    image_exts: list[str] = field(default_factory=lambda: list(IMAGE_EXTS))

    def __post_init__(self):
        check(self.boxes in ("file", "components", "none"), "boxes", self.boxes,
              "must be file, components or none")
        check(self.ocr in ("tesseract", "none"), "ocr", self.ocr, "must be tesseract or none")
        check(self.boxes != "none" or self.ocr != "none", "boxes", self.boxes,
              "and regions.ocr=none leave no region source")
        check(0.0 <= self.ocr_min_conf <= 100.0, "ocr_min_conf", self.ocr_min_conf, "must be in [0, 100]")
        check(1 <= self.ocr_scale <= 8, "ocr_scale", self.ocr_scale, "must be in [1, 8]")
        check(0 <= self.ocr_psm <= 13, "ocr_psm", self.ocr_psm, "must be a Tesseract --psm (0-13)")
        for k in ("min_edge", "ocr_min_edge", "ocr_min_chars", "components_close"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")
        check(1 <= self.components_threshold <= 255, "components_threshold", self.components_threshold,
              "must be in [1, 255]")
        check(self.crop in ("square", "box"), "crop", self.crop, "must be square or box")
        check(self.dtype in ("float16", "float32"), "dtype", self.dtype, "must be float16 or float32")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.prefetch_factor > 0, "prefetch_factor", self.prefetch_factor, "must be > 0")
        check(bool(self.image_exts), "image_exts", self.image_exts, "must not be empty")
        check(isinstance(self.input, str) and bool(self.input), "input", self.input, "must be a non-empty string")


class RegionsFailed(StageError):
    """Some shards could not be read; every other part was written (exit 1, rerun retries them)."""
    label = "regions failed"


# ---------------------------------------------------------------- region sources

def components(rgb: np.ndarray, threshold: int, close: int) -> list[list[float]]:
    """Boxes of the connected non-background areas of an H x W x 3 image (see the module doc)."""
    from scipy import ndimage
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.int16)
    bg = np.median(border, axis=0)
    fg = np.abs(rgb.astype(np.int16) - bg).max(axis=-1) > threshold
    grown = ndimage.binary_dilation(fg, iterations=close) if close else fg
    lab, _ = ndimage.label(grown)
    lab[~fg] = 0  # boxes of the pixels themselves, not of the dilation
    return [[float(s[1].start), float(s[0].start), float(s[1].stop), float(s[0].stop)]
            for s in ndimage.find_objects(lab) if s is not None]


def tesseract_words(images: list, cfg: RegionsConfig) -> list[list[tuple[list[float], str, float]]]:
    """Word boxes (stored-image px), text and confidence per image: one Tesseract run for all."""
    import pytesseract
    from PIL import Image
    if not images:
        return []
    s = cfg.ocr_scale
    with tempfile.TemporaryDirectory(prefix="mlcd-ocr-") as tmp:
        paths = []
        for i, im in enumerate(images):
            paths.append(os.path.join(tmp, f"{i}.png"))
            (im.resize((im.width * s, im.height * s), Image.Resampling.BICUBIC) if s > 1 else im).save(paths[i])
        listing = os.path.join(tmp, "images.txt")
        Path(listing).write_text("\n".join(paths) + "\n")
        d = pytesseract.image_to_data(listing, lang=cfg.ocr_lang, config=f"--psm {cfg.ocr_psm}",
                                      output_type=pytesseract.Output.DICT)
    out = [[] for _ in images]
    for page, level, text, conf, x, y, w, h in zip(d["page_num"], d["level"], d["text"], d["conf"],
                                                   d["left"], d["top"], d["width"], d["height"]):
        if int(level) == 5 and str(text).strip():  # level 5: a word
            out[int(page) - 1].append(([x / s, y / s, (x + w) / s, (y + h) / s], str(text).strip(), float(conf)))
    return out


def clean_word(text: str) -> str:
    """The word without the punctuation Tesseract reads around it ("stop." -> "stop")."""
    return text.strip(" \t\"'`.,;:!?()[]{}<>|-_~*/\\")


def check_ocr(cfg: RegionsConfig) -> None:
    """regions.ocr=tesseract needs the binding, the binary and the language: one line if not."""
    if cfg.ocr != "tesseract":
        return
    fix = "apt-get install tesseract-ocr tesseract-ocr-eng (make apt), or set regions.ocr=none"
    try:
        import pytesseract
    except ImportError:
        raise ConfigError("regions.ocr='tesseract': the pytesseract package is missing "
                          "(pip install -r requirements.txt), or set regions.ocr=none") from None
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        raise ConfigError(f"regions.ocr='tesseract': the tesseract binary is not installed; {fix}")
    if cfg.ocr_lang not in pytesseract.get_languages(config=""):
        raise ConfigError(f"regions.ocr_lang={cfg.ocr_lang!r}: Tesseract has no such language data; {fix}")


def box_file(cfg: RegionsConfig, url: str) -> str:
    return fs.join(cfg.boxes_dir, f"{shard_stem(url)}.parquet")  # boxes_dir may be a URL


def read_box_file(path: str) -> dict[str, tuple[list, list, list]]:
    """key -> (boxes, kinds, texts) of one shard's box parquet."""
    names = read_parquet_schema(path).names
    t = read_parquet(path, columns=[*BOX_COLUMNS, *(["text"] if "text" in names else [])]).to_pydict()
    texts = t.get("text") or [None] * len(t["key"])
    return {str(k): (b or [], kd or [], tx or [""] * len(b or [])) for k, b, kd, tx
            in zip(t["key"], t["boxes"], t["kind"], texts)}


def check_box_files(cfg: RegionsConfig, shards: list[str]) -> None:
    """Rank 0, before any work: every shard's box file exists with the format's columns."""
    fs.check(cfg.boxes_dir, "regions.boxes_dir")
    for url in shards:
        p = box_file(cfg, url)
        if not fs.isfile(p):
            raise ConfigError(f"regions.boxes_dir={cfg.boxes_dir!r}: no box file {p} for shard {url} "
                              f"(regions.boxes=file; use components or none for no box file)")
        try:
            names = read_parquet_schema(p).names
        except fs.FsError:
            raise
        except Exception as e:  # noqa: BLE001 -- an unreadable file is named, not traced
            raise StageError(f"box file {p}: unreadable ({type(e).__name__}: {e})") from None
        missing = [c for c in BOX_COLUMNS if c not in names]
        if missing:
            raise StageError(f"box file {p}: missing column(s) {missing} (has {names})")


# ---------------------------------------------------------------- boxes -> kept regions

def clean_box(box, kind: str, text: str, conf: float, w: int, h: int, cfg: RegionsConfig):
    """(x0, y0, x1, y1) ints clipped to the image, or a skip reason."""
    if kind not in KINDS:
        return "bad_kind"
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return "degenerate"
    if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
        return "degenerate"
    x0, y0, x1, y1 = max(0, math.floor(x0)), max(0, math.floor(y0)), min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if x1 <= x0 or y1 <= y0:
        return "out_of_image"
    if kind == "ocr":
        if not any(c.isalnum() for c in text):
            return "empty_text"
        if conf < cfg.ocr_min_conf:
            return "low_conf"
        if len(text) < cfg.ocr_min_chars:
            return "short_text"
    if min(x1 - x0, y1 - y0) < (cfg.ocr_min_edge if kind == "ocr" else cfg.min_edge):
        return "too_small"
    return x0, y0, x1, y1


def crop(img, box, mode: str):
    """The region's picture: the box, or the square on its centre (outside the image: white)."""
    from PIL import Image
    x0, y0, x1, y1 = box
    if mode == "box":
        return img.crop(box)
    side = max(x1 - x0, y1 - y0)
    sx, sy = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    out = Image.new("RGB", (side, side), (255, 255, 255))
    inner = (max(sx, 0), max(sy, 0), min(sx + side, img.width), min(sy + side, img.height))
    out.paste(img.crop(inner), (inner[0] - sx, inner[1] - sy))
    return out


def candidates(img, file_rows, words, cfg: RegionsConfig):
    """Every candidate of one image: (box, kind, text, source, conf)."""
    out = []
    if cfg.boxes == "file" and file_rows is not None:
        boxes, kinds, texts = file_rows
        if not (len(boxes) == len(kinds) == len(texts)):
            return None  # a malformed row: counted as bad_row for the image
        out += [(b, str(k), clean_word(str(t or "")), "file", 100.0 if k == "ocr" else -1.0)
                for b, k, t in zip(boxes, kinds, texts)]
    elif cfg.boxes == "components":
        out += [(b, "object", "", "components", -1.0) for b in
                components(np.asarray(img), cfg.components_threshold, cfg.components_close)]
    out += [(b, "ocr", clean_word(t), "tesseract", c) for b, t, c in words]
    return out


# ---------------------------------------------------------------- reading shards (DataLoader workers)

class ShardRegions(IterableDataset):
    """Yields batches of region crops of one shard at a time: {"part", "pixels", "rows",
    "images", "end", "stats", "error"}; each DataLoader worker takes whole shards."""

    def __init__(self, parts: list[tuple[int, str]], cfg: RegionsConfig, preprocess, image_size: int):
        self.parts, self.cfg, self.preprocess, self.image_size = parts, cfg, preprocess, image_size

    def __iter__(self):
        info = get_worker_info()
        if self.cfg.ocr == "tesseract":  # one thread per Tesseract run: the workers are the parallelism
            os.environ.setdefault("OMP_THREAD_LIMIT", "1")
        for part, url in (self.parts[info.id::info.num_workers] if info else self.parts):
            try:
                yield from self._shard(part, url)
            except Exception as e:  # noqa: BLE001 -- unreadable tar / box file, OCR failure: this shard fails
                yield {"part": part, "error": f"{type(e).__name__}: {e}", "end": True}

    def _images(self, url: str, stats: collections.Counter):
        """(key, RGB image) chunks of ``batch_size`` images (one OCR run each)."""
        chunk, seen = [], set()
        for s in read_samples(url):
            stats["images"] += 1
            stats["images_batch"] += 1
            key = s["__key__"]
            if key in seen:
                stats["image_skipped/duplicate_key"] += 1
                continue
            seen.add(key)
            if "__skip__" in s:  # a member over run.max_member_bytes: never read
                stats[f"image_skipped/{s['__skip__']}"] += 1
                continue
            img, why = load_rgb(image_bytes(s, self.cfg.image_exts), self.cfg.max_pixels)
            if img is None:
                stats[f"image_skipped/{why}"] += 1
                continue
            chunk.append((key, img))
            if len(chunk) == self.cfg.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _shard(self, part: int, url: str):
        cfg, stats = self.cfg, collections.Counter()
        file_rows = read_box_file(box_file(cfg, url)) if cfg.boxes == "file" else {}
        pixels, rows = [], []
        for chunk in self._images(url, stats):
            words = (tesseract_words([im for _, im in chunk], cfg) if cfg.ocr == "tesseract"
                     else [[] for _ in chunk])
            for (key, img), wds in zip(chunk, words):
                for px, row in self._regions(key, img, file_rows, wds, stats):
                    pixels.append(px)
                    rows.append(row)
                    if len(rows) == cfg.batch_size:
                        yield self._batch(part, pixels, rows, stats)
                        pixels, rows = [], []
        yield self._batch(part, pixels, rows, stats, end=True)

    def _regions(self, key: str, img, file_rows: dict, words, stats: collections.Counter):
        if self.cfg.boxes == "file" and key not in file_rows:
            stats["images_without_boxes"] += 1
        cands = candidates(img, file_rows.get(key), words, self.cfg)
        if cands is None:
            stats["image_skipped/bad_row"] += 1
            return
        j = 0
        for box, kind, text, source, conf in cands:
            kept = clean_box(box, kind, text, conf, img.width, img.height, self.cfg)
            if isinstance(kept, str):
                stats[f"skipped/{kept}"] += 1
                continue
            stats[f"kept/{kind}"] += 1
            yield self.preprocess(crop(img, kept, self.cfg.crop)), {
                "key": f"{key}.r{j}", "image_key": key, "x0": kept[0], "y0": kept[1], "x1": kept[2],
                "y1": kept[3], "img_w": img.width, "img_h": img.height, "kind": kind,
                "text": text if kind == "ocr" else "", "source": source, "conf": conf}
            j += 1

    def _batch(self, part, pixels, rows, stats, end=False):
        x = torch.stack(pixels) if pixels else torch.empty(0, 3, self.image_size, self.image_size)
        images = stats.pop("images_batch", 0)  # images read since the last batch (progress bar)
        return {"part": part, "pixels": x, "rows": rows, "images": images, "end": end,
                "stats": dict(stats) if end else None, "error": None}


# ---------------------------------------------------------------- the stage

COLUMNS = {"key": pa.string(), "image_key": pa.string(), "x0": pa.int32(), "y0": pa.int32(),
           "x1": pa.int32(), "y1": pa.int32(), "img_w": pa.int32(), "img_h": pa.int32(),
           "kind": pa.string(), "text": pa.string(), "source": pa.string(), "conf": pa.float32()}


def _write(out: Path, part: int, url: str, feats: list, rows: list, stats: dict, dim: int, cfg) -> dict:
    emb = torch.cat(feats).cpu().numpy() if feats else np.zeros((0, dim), np.float32)
    table = pa.table({**{c: pa.array([r[c] for r in rows], t) for c, t in COLUMNS.items()},
                      "shard": pa.array([url] * len(rows), pa.string())})
    info = {"part": part, "shard": url, "rows": len(rows), **split_stats(stats)}
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(info).encode()})
    write_part(out, part, {"img": emb}, table, dtype=np.dtype(cfg.dtype))
    return info


def split_stats(stats: dict) -> dict:
    """Flat worker counters -> {"images", "images_skipped", "images_without_boxes", "kept", "skipped"}."""
    out = {"images": stats.get("images", 0), "images_without_boxes": stats.get("images_without_boxes", 0),
           "images_skipped": {}, "kept": {}, "skipped": {}}
    for k, v in sorted(stats.items()):
        head, _, reason = k.partition("/")
        if head in ("image_skipped", "kept", "skipped"):
            out["images_skipped" if head == "image_skipped" else head][reason] = v
    return out


def _region_parts(mine, shards, out: Path, cfg: RegionsConfig, run: RunConfig, enc, ctx, tracker):
    """This rank's shards -> parts (each written as it ends). -> (failures, infos, images, regions)."""
    failures, written, images, regions, t0 = [], [], 0, 0, time.perf_counter()
    if not mine:
        return failures, written, images, regions
    workers = min(cfg.workers, len(mine))
    # pinned host memory on CUDA: the crops' host->GPU copy overlaps compute (as in stage 1)
    loader = DataLoader(ShardRegions(mine, cfg, enc.preprocess, enc.image_size), batch_size=None,
                        num_workers=workers, prefetch_factor=cfg.prefetch_factor if workers else None,
                        pin_memory=ctx.device.type == "cuda",
                        worker_init_fn=die_with_parent_fn() if workers else None)
    bar = progress(_expected_rows([u for _, u in mine]), "regions", ctx)
    bufs: dict[int, tuple[list, list]] = {}
    for step, b in enumerate(loader):
        part = b["part"]
        if b["error"]:
            bufs.pop(part, None)
            failures.append({"part": part, "shard": shards[part], "error": b["error"]})
            log.error("shard %s (part %d) failed: %s", shards[part], part, b["error"])
            continue
        feats, rows = bufs.setdefault(part, ([], []))
        if b["rows"]:
            feats.append(enc.encode_images(b["pixels"]))
            rows += b["rows"]
            regions += len(b["rows"])
        if b["end"]:
            info = _write(out, part, shards[part], *bufs.pop(part), b["stats"], enc.img_dim, cfg)
            written.append(info)
            images += info["images"]
            secs = max(time.perf_counter() - t0, 1e-9)
            log.info("part %d: %d images -> %d regions %s; %d/%d parts, %.1f images/s, %.1f regions/s",
                     part, info["images"], info["rows"], info["kept"], len(written), len(mine),
                     images / secs, regions / secs)
        bar.update(b["images"])
        if step % max(run.log_every, 1) == 0 or b["end"]:
            secs = max(time.perf_counter() - t0, 1e-9)
            tracker.log({"regions/regions_per_s": regions / secs, "regions/images_per_s": images / secs,
                         "regions/regions": regions, "regions/parts_written": len(written)}, step=step)
    bar.close()
    return failures, written, images, regions


def regions(run: RunConfig, cfg: RegionsConfig, ctx: DistContext) -> dict:
    out = Path(cfg.out_dir)
    try:
        shards = expand_shards(cfg.input)
    except ShardPolicyError as e:  # exit 1: the input names something the run may not open
        raise ShardPolicyError(f"regions.input={cfg.input!r}: {e}") from None
    except ShardSpecError as e:
        raise ConfigError(f"regions.input={cfg.input!r}: {e}") from None

    def unfinished() -> list[int]:  # rank 0 checks inputs and lists the work, before any model load
        check_ocr(cfg)
        if cfg.boxes == "file":
            check_box_files(cfg, shards)
        prepare_out_dir(out, run, {"run": run, "regions": cfg}, "regions")
        for sub in ("img_emb", "metadata"):
            clean_stale_tmp(out / sub)
        return [i for i in range(len(shards)) if not part_complete(out, i, ["img"])]

    todo = ctx.agree(unfinished)
    mine = [(i, shards[i]) for i in ctx.shard(todo)]
    log.info("%d shards, %d done, %d to do (%d on this rank) -> %s",
             len(shards), len(shards) - len(todo), len(todo), len(mine), fs.url_of(out))
    torch.manual_seed(run.seed)  # a random-init encoder is the same on every rank/rerun
    enc = build_encoder(cfg.encoder, ctx.device)
    tracker = Tracker(run, ctx, str(out), "regions", {"run": to_dict(run), "regions": to_dict(cfg)})
    t0 = time.perf_counter()
    failures, written, images, n = _region_parts(mine, shards, out, cfg, run, enc, ctx, tracker)
    secs = time.perf_counter() - t0
    log.info("rank %d: %d images -> %d regions in %.1f s (%.1f images/s, %.1f regions/s), %d parts",
             ctx.rank, images, n, secs, images / max(secs, 1e-9), n / max(secs, 1e-9), len(written))
    gathered = ctx.all_gather_object({"failures": failures, "images": images, "regions": n, "secs": secs})
    failures = sorted((f for g in gathered for f in g["failures"]), key=lambda f: f["part"])
    summary = {"regions": sum(g["regions"] for g in gathered), "images": sum(g["images"] for g in gathered),
               "secs": max(g["secs"] for g in gathered), "parts_written": len(todo) - len(failures),
               "failures": failures}
    if ctx.is_main:
        summary["stats"] = write_stats(out, shards, enc, failures)
    tracker.finish()

    def all_written() -> None:
        if failures:
            lines = "\n".join(f"  part {f['part']}: {f['shard']}: {f['error']}" for f in failures)
            raise RegionsFailed(f"{len(failures)} of {len(shards)} shards failed (rerun to retry them):\n{lines}")
    ctx.agree(all_written)
    return summary


def write_stats(out: Path, shards: list[str], enc, failures: list) -> dict:
    """``stats.json`` from every finished part's own counts (written by any rank, any run)."""
    parts = [part_info(out, i) for i in range(len(shards)) if part_complete(out, i, ["img"])]
    total = {k: collections.Counter() for k in ("kept", "skipped", "images_skipped")}
    for p in parts:
        for k, c in total.items():
            c.update(p.get(k, {}))
    stats = {"complete": len(parts) == len(shards), "num_shards": len(shards), "num_parts": len(parts),
             "regions": sum(p["rows"] for p in parts), "images": sum(p.get("images", 0) for p in parts),
             "images_without_boxes": sum(p.get("images_without_boxes", 0) for p in parts),
             **{k: dict(sorted(c.items())) for k, c in total.items()},
             "encoder": enc.describe(), "dim": enc.img_dim, "failed_shards": failures, "parts": parts}
    atomic_write_json(out / "stats.json", stats)
    return stats


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("regions", regions, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("regions")
