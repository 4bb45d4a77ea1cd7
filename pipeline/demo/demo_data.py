"""Demo data, built offline from Debian packages: real image-text shards in img2dataset layout.

- pretraining pool (``{out}/train``): openclipart PNGs (caption from the file name, category as
  label) and emoji rendered from Noto Color Emoji (caption = the Unicode name, group/subgroup);
- held-out labeled probe sets (``{out}/probe/{name}/{train,test}``, samples carry ``cls``, plus a
  ``classes.json``): openclipart images of the larger categories that are *not* in the pool, and
  Fashion-MNIST.

Deterministic (sorted inputs, seeded shuffle), so shard i always holds the same samples and a
killed build resumes by skipping shards whose ``_stats.json`` exists.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import struct
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.config import RESUMABLE, RunConfig, check, prepare_out_dir
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.images import load_rgb
from pipeline.core.io import atomic_write_json
from pipeline.core.shards import InlinePool, ShardWriter, encode_image
from pipeline.demo.rice_data import RiceConfig

log = logging.getLogger("mlcd.data")

FMNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot"]


@dataclass
class DataConfig:
    out_dir: str = "${run.out_dir}/data"
    image_size: int = 128          # longest side stored in the shards (downscaled, aspect kept)
    samples_per_shard: int = 500
    workers: int = field(default=2, metadata=RESUMABLE)
    max_pixels: int = 89_478_485   # Pillow's decompression-bomb limit; larger files are skipped
    openclipart_dir: str = "/usr/share/openclipart/png"
    openclipart_max: int = 0       # 0 = all (after the probe hold-out)
    probe_min_per_class: int = 60  # categories with at least this many images feed the probe
    probe_fraction: float = 0.3    # of those categories' images, held out of the pool
    probe_max: int = 0             # cap per probe split (train / test); 0 = all
    emoji_test_file: str = "/usr/share/unicode/emoji/emoji-test.txt"
    emoji_font: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    emoji_max: int = 0             # 0 = all
    fmnist_dir: str = "/usr/share/datasets/fashion-mnist"
    fmnist_train: int = 2000
    fmnist_test: int = 1000
    fmnist_pool: int = 0           # Fashion-MNIST training images added (unlabeled) to the pool,
    #                                disjoint from the probe's train images; test images never
    rice: RiceConfig = field(default_factory=RiceConfig)  # `mlcd data rice` (pipeline/demo/rice_data.py)

    def __post_init__(self):
        check(16 <= self.image_size <= 1024, "image_size", self.image_size, "must be in [16, 1024]")
        check(self.samples_per_shard > 0, "samples_per_shard", self.samples_per_shard, "must be > 0")
        check(0.0 < self.probe_fraction < 1.0, "probe_fraction", self.probe_fraction, "must be in (0, 1)")
        check(self.workers >= 1, "workers", self.workers, "must be >= 1")
        check(self.fmnist_train + self.fmnist_pool <= 60_000, "fmnist_pool", self.fmnist_pool,
              f"+ fmnist_train ({self.fmnist_train}) must be <= 60000 (Fashion-MNIST's train split)")
        for k in ("openclipart_max", "emoji_max", "fmnist_train", "fmnist_test", "max_pixels", "probe_max",
                  "fmnist_pool"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")


# ---------------------------------------------------------------- sources -> sample descriptions

def _stable_frac(s: str) -> float:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _clipart_caption(path: Path) -> str:
    stem = re.sub(r"_?\d+$", "", path.stem)  # trailing version numbers
    words = [w for w in re.split(r"[_\-\s.]+", stem) if w and not w.isdigit()]
    return " ".join(words) or path.parent.name


def openclipart_items(cfg: DataConfig, seed: int) -> tuple[list[dict], dict[str, list[dict]], list[str]]:
    root = Path(cfg.openclipart_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} missing: install it with `apt-get install openclipart-png`")
    files = sorted(root.rglob("*.png"))
    by_cat: dict[str, list[Path]] = {}
    for f in files:
        by_cat.setdefault(f.relative_to(root).parts[0], []).append(f)
    probe_classes = sorted(c for c, fs in by_cat.items()
                           if len(fs) >= cfg.probe_min_per_class and c not in ("unsorted", "special"))
    pool, probe = [], {"train": [], "test": []}
    for cat, fs in sorted(by_cat.items()):
        for f in fs:
            item: dict[str, Any] = {"kind": "file", "path": str(f), "caption": _clipart_caption(f), "source": "openclipart",
                    "label": cat, "url": f"file://{f}"}
            # Hash split on category + caption, not on the path: versions of one drawing
            # (`name_01.png`, `name_02.png`) share a caption and must land on the same side, or
            # the probe's test set leaks into its train set (and into the pretraining pool).
            u = _stable_frac(f"{cat}/{item['caption']}")
            if cat in probe_classes and u < cfg.probe_fraction:
                item["cls"] = probe_classes.index(cat)
                probe["train" if u < cfg.probe_fraction / 2 else "test"].append(item)
            else:
                pool.append(item)
    random.Random(seed).shuffle(pool)
    if cfg.openclipart_max:
        pool = pool[:cfg.openclipart_max]
    if cfg.probe_max:
        for split in probe:
            random.Random(seed + 2).shuffle(probe[split])
            probe[split] = probe[split][:cfg.probe_max]
    return pool, probe, probe_classes


def emoji_items(cfg: DataConfig) -> list[dict]:
    path = Path(cfg.emoji_test_file)
    if not path.is_file() or not Path(cfg.emoji_font).is_file():
        raise FileNotFoundError(f"{path} or {cfg.emoji_font} missing: install them with "
                                "`apt-get install unicode-data fonts-noto-color-emoji`")
    items, group, sub = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            sub = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            cps = [int(c, 16) for c in line.split(";")[0].split()]
            # Pillow's basic text layout draws one glyph per code point: keep emoji that are a
            # single glyph (a code point plus an optional presentation selector U+FE0F).
            if len([c for c in cps if c != 0xFE0F]) != 1:
                continue
            name = re.sub(r"^E\d+\.\d+\s+", "", line.split("#", 1)[1].strip().split(" ", 1)[1])
            items.append({"kind": "emoji", "text": "".join(map(chr, cps)), "caption": name,
                          "source": "emoji", "label": f"{group}/{sub}",
                          "url": "emoji:" + "-".join(f"{c:X}" for c in cps)})
    return items[:cfg.emoji_max] if cfg.emoji_max else items


def fmnist_items(cfg: DataConfig, split: str, n: int, seed: int, skip: int = 0) -> list[dict]:
    """n images of a split in a seeded order, after the first `skip` (the pool takes the train
    images after the probe's, so they never overlap)."""
    d = Path(cfg.fmnist_dir)
    prefix = "train" if split == "train" else "t10k"
    img_path, lab_path = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file():
        raise FileNotFoundError(f"{img_path} missing: install it with `apt-get install dataset-fashion-mnist`")
    with gzip.open(img_path) as f:
        _, num, rows, cols = struct.unpack(">IIII", f.read(16))
        images = np.frombuffer(f.read(), np.uint8).reshape(num, rows, cols)
    with gzip.open(lab_path) as f:
        f.read(8)
        labels = np.frombuffer(f.read(), np.uint8)
    idx = np.random.default_rng(seed).permutation(num)[skip:skip + n]
    return [{"kind": "array", "array": images[i], "caption": FMNIST_CLASSES[labels[i]],
             "source": "fashion-mnist", "label": FMNIST_CLASSES[labels[i]], "cls": int(labels[i]),
             "url": f"fashion-mnist:{prefix}:{i}"} for i in idx]


# ---------------------------------------------------------------- rendering (in worker processes)

def _render(item: dict, size: int, max_pixels: int, font_path: str):
    """-> (image bytes, ext, meta) or (None, reason, meta). Runs in a worker process."""
    from PIL import Image, ImageDraw, ImageFont
    Image.MAX_IMAGE_PIXELS = None  # we enforce max_pixels ourselves, before decoding
    meta = {"url": item["url"], "source": item["source"], "label": item["label"]}
    if "cls" in item:
        meta["cls"] = item["cls"]
    try:
        if item["kind"] == "file":
            with Image.open(item["path"]) as im:  # header only: the size, before decoding
                meta.update(original_width=im.width, original_height=im.height)
            img, why = load_rgb(item["path"], max_pixels, draft=size)  # the stages' decoder
            if img is None:
                return None, "decompression_bomb" if why == "too_large" else f"decode_error:{why}", meta
            img = img.convert("RGBA")
        elif item["kind"] == "emoji":
            font = ImageFont.truetype(font_path, 109)  # the one size the bitmap font has
            img = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
            ImageDraw.Draw(img).text((0, 0), item["text"], font=font, embedded_color=True)
            bbox = img.getbbox()
            if bbox is None:
                return None, "empty_render", meta
            img = img.crop(bbox)
        else:
            img = Image.fromarray(item["array"], mode="L").convert("RGBA")
    except Exception as e:  # truncated / unreadable file: skip, counted by reason
        return None, f"decode_error:{type(e).__name__}", meta
    # Transparent clip art on white, longest side scaled to `size`.
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(bg, img).convert("RGB")
    scale = size / max(img.size)
    if scale < 1 or item["kind"] != "file":
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    meta.update(width=img.width, height=img.height)
    data, ext = encode_image(img, "jpg")
    return data, ext, meta


def _render_star(args):
    return _render(*args)


def write_shards(items: list[dict], folder: Path, cfg: DataConfig, desc: str) -> dict:
    """Writes ``items`` into shards of ``cfg.samples_per_shard``; skips complete shards."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(items) + cfg.samples_per_shard - 1) // cfg.samples_per_shard
    totals: dict[str, Any] = {"samples": 0, "skipped": {}, "shards": n_shards}
    todo = [s for s in range(n_shards) if not ShardWriter.is_complete(folder, s)]
    with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else InlinePool() as ex:
        bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, disable=None)
        bar.update((n_shards - len(todo)) * cfg.samples_per_shard)
        for s in todo:
            chunk = items[s * cfg.samples_per_shard:(s + 1) * cfg.samples_per_shard]
            w = ShardWriter(folder, s)
            args = [(it, cfg.image_size, cfg.max_pixels, cfg.emoji_font) for it in chunk]
            for i, (it, (data, ext, meta)) in enumerate(zip(chunk, ex.map(_render_star, args, chunksize=8))):
                key = f"{s:05d}{i:04d}"
                if data is None:
                    w.add_failure(key, it["url"], ext, meta)
                else:
                    w.write(key, data, ext, it["caption"], meta)
                bar.update(1)
            w.close()
        bar.close()
    for s in range(n_shards):
        st = json.loads((folder / f"{s:05d}_stats.json").read_text())
        totals["samples"] += st["successes"]
        for reason, c in st["status_dict"].items():
            if reason != "success":
                totals["skipped"][reason] = totals["skipped"].get(reason, 0) + c
    return totals


def build(run: RunConfig, cfg: DataConfig) -> dict:
    out = Path(cfg.out_dir)
    summary = {}
    pool, probe, classes = openclipart_items(cfg, run.seed)
    pool = pool + emoji_items(cfg)
    if cfg.fmnist_pool:  # unlabeled pool images: no class in the caption, no `cls`
        pool += [{**{k: v for k, v in it.items() if k != "cls"}, "caption": "fashion-mnist",
                  "label": "fashion-mnist"} for it in fmnist_items(cfg, "train", cfg.fmnist_pool, run.seed, skip=cfg.fmnist_train)]
    random.Random(run.seed + 1).shuffle(pool)
    summary["train"] = write_shards(pool, out / "train", cfg, "demo shards: train pool")
    for split in ("train", "test"):
        summary[f"probe/openclipart/{split}"] = write_shards(
            probe[split], out / "probe" / "openclipart" / split, cfg, f"probe openclipart {split}")
        atomic_write_json(out / "probe" / "openclipart" / split / "classes.json", classes)
    for split, n in (("train", cfg.fmnist_train), ("test", cfg.fmnist_test)):
        if n:
            items = fmnist_items(cfg, split, n, run.seed)
            summary[f"probe/fmnist/{split}"] = write_shards(
                items, out / "probe" / "fmnist" / split, cfg, f"probe fashion-mnist {split}")
            atomic_write_json(out / "probe" / "fmnist" / split / "classes.json", FMNIST_CLASSES)
    atomic_write_json(out / "manifest.json", summary)
    return summary


def make_data(run: RunConfig, cfg: DataConfig) -> dict:
    """The `data` stage (one process: the builders fan out to worker processes themselves)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prepare_out_dir(cfg.out_dir, run, {"run": run, "data": cfg}, "data")
    summary = build(run, cfg)
    for name, s in summary.items():
        log.info("%-28s %6d samples in %3d shards, skipped %s", name, s["samples"], s["shards"], s["skipped"])
    return summary


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("data", make_data, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("data")
