"""RICE demo scenes (``mlcd data rice``): small real scenes with objects and words at known boxes.

Each scene is a light plain background with 1-3 openclipart drawings (their category folder is
the label) and 1-2 words from a fixed vocabulary of common English words rendered with Noto
fonts (Debian ``fonts-noto-core``), nothing overlapping. Written under ``{data.out_dir}/rice``::

    train/{00000..}.tar            pretraining pool, img2dataset layout (KEY.png, KEY.txt, KEY.json)
    boxes/{00000..}.parquet        the pool's OBJECT boxes in the external box format (key, boxes
                                   [[x0, y0, x1, y1], ...] in stored-image pixels, kind, text):
                                   the composer acts as the detector; words are left for OCR
    probe/{train,test}/{00000..}.tar + gt_{00000..}.parquet
                                   held-out scenes with every box and its label (key, boxes,
                                   kind "object" | "ocr", label: category or word)
    classes.json                   the categories and the word vocabulary

The clip-art files are split by a hash of category + caption (like ``mlcd data demo``, so the
versions of one drawing stay on one side): pool, probe-train and probe-test never share a
drawing. Scene ``i`` of a split is a function of (seed, split, i) alone, so shard ``s`` always
holds the same scenes and a killed build resumes by skipping shards whose ``_stats.json`` exists
(the box/ground-truth parquet is written before it). The config lives in ``data.rice``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import check, prepare_out_dir, to_dict
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.errors import InputError
from pipeline.core.io import atomic_path, atomic_write_json
from pipeline.core.shards import InlinePool, ShardWriter, encode_image

log = logging.getLogger("mlcd.data.rice")

NOTO = "/usr/share/fonts/truetype/noto"
# Short, common, dictionary words: Tesseract's English model reads these best.
WORDS = ("apple", "baby", "bird", "blue", "boat", "book", "bread", "cake", "chair", "city", "cold",
         "door", "dream", "earth", "fire", "fish", "flower", "food", "friend", "game", "garden",
         "gold", "green", "happy", "heart", "home", "horse", "house", "king", "light", "milk",
         "money", "moon", "music", "night", "ocean", "open", "paper", "party", "phone", "plant",
         "rain", "river", "road", "school", "ship", "smile", "snow", "star", "stop", "storm", "sugar",
         "summer", "table", "time", "tree", "water", "winter", "world", "yellow")
SPLITS = {"train": 0, "probe/train": 1, "probe/test": 2}  # the seed stream of each split


@dataclass
class RiceConfig:
    pool_scenes: int = 2500          # scenes in rice/train
    probe_train: int = 300           # probe scenes (ground truth) per split
    probe_test: int = 300
    scene_size: int = 128            # square scenes, px
    objects: list[int] = field(default_factory=lambda: [1, 3])   # min, max per scene
    words: list[int] = field(default_factory=lambda: [1, 2])     # min, max per scene
    object_px: list[int] = field(default_factory=lambda: [36, 64])  # longest side of a drawing
    font_px: list[int] = field(default_factory=lambda: [20, 26])    # font size (cap height ~0.7x)
    fonts: list[str] = field(default_factory=lambda: [f"{NOTO}/{f}.ttf" for f in (
        "NotoSans-Regular", "NotoSans-Bold", "NotoSerif-Regular", "NotoSerif-Bold")])
    vocabulary: list[str] = field(default_factory=lambda: list(WORDS))
    categories: list[str] = field(default_factory=list)  # [] = every folder with >= min_per_category
    min_per_category: int = 40
    probe_fraction: float = 0.3      # of each category's drawings, held out for the probe splits
    max_drawing_pixels: int = 4_000_000  # larger files (a few posters of 100M+ px) are left out:
    #                                      decoding one costs seconds, for a 64 px drawing

    def __post_init__(self):
        for k in ("objects", "words", "object_px", "font_px"):
            v = getattr(self, k)
            check(len(v) == 2 and 0 <= v[0] <= v[1], k, v, "must be [min, max] with 0 <= min <= max")
        check(self.objects[0] >= 1 or self.words[0] >= 1, "objects", self.objects,
              "a scene needs at least one object or word (objects/words min)")
        check(8 <= self.object_px[0] and self.object_px[1] <= self.scene_size // 2, "object_px",
              self.object_px, "must lie in [8, scene_size / 2]")
        check(self.font_px[0] >= 6, "font_px", self.font_px, "must be >= 6 px")
        check(32 <= self.scene_size <= 1024, "scene_size", self.scene_size, "must be in [32, 1024]")
        for k in ("pool_scenes", "probe_train", "probe_test"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")
        check(0.0 < self.probe_fraction < 1.0, "probe_fraction", self.probe_fraction, "must be in (0, 1)")
        check(self.max_drawing_pixels > 0, "max_drawing_pixels", self.max_drawing_pixels, "must be > 0")
        check(bool(self.vocabulary) and all(w.isalpha() for w in self.vocabulary), "vocabulary",
              self.vocabulary[:3], "must be a non-empty list of alphabetic words")
        check(bool(self.fonts), "fonts", self.fonts, "must name at least one font file")


# ---------------------------------------------------------------- inputs (checked before any work)

def clipart_pools(cfg: RiceConfig, clip_dir: str) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """(categories, {split: {category: [png paths]}}): every drawing on exactly one side."""
    root = Path(clip_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data.openclipart_dir={clip_dir} missing: apt-get install openclipart-png")
    missing = [f for f in cfg.fonts if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"data.rice.fonts: {missing[0]} missing: apt-get install fonts-noto-core")
    by_cat: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*.png")):
        if _pixels(f) <= cfg.max_drawing_pixels:
            by_cat.setdefault(f.relative_to(root).parts[0], []).append(f)
    cats = cfg.categories or sorted(c for c, fs in by_cat.items() if len(fs) >= cfg.min_per_category
                                    and c not in ("unsorted", "special"))
    unknown = [c for c in cats if c not in by_cat]
    if unknown or not cats:
        raise FileNotFoundError(f"data.rice.categories: {unknown or cats} not folders of {root}")
    pools = {s: {c: [] for c in cats} for s in SPLITS}
    for c in cats:
        for f in by_cat[c]:
            stem = "".join(ch for ch in f.stem if not ch.isdigit()).strip("_-")  # versions of a drawing
            u = int(hashlib.sha1(f"{c}/{stem}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split = ("train" if u >= cfg.probe_fraction
                     else "probe/train" if u < cfg.probe_fraction / 2 else "probe/test")
            pools[split][c].append(str(f))
    for s, per in pools.items():
        empty = [c for c, fs in per.items() if not fs]
        if empty:
            raise FileNotFoundError(f"data.rice: category {empty[0]!r} has no drawing left for {s}")
    return cats, pools


def _pixels(path: Path) -> int:
    """Width x height from the header alone (no pixel decoded); unreadable files count as too big."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.width * im.height
    except Exception:  # noqa: BLE001 -- any unreadable file is simply not used
        return 1 << 62


# ---------------------------------------------------------------- one scene (in worker processes)

@functools.lru_cache(maxsize=512)
def _drawing(path: str, size: int):
    """RGBA drawing, longest side ``size``, cropped to its visible pixels (None if unreadable).
    Read with Pillow, not ``pipeline.core.images.load_rgb``: placing a drawing needs its alpha, which
    the stages' decoder composites away (the scene it lands in is then read by that decoder)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA")
    except Exception:  # noqa: BLE001 -- a broken file just isn't drawn
        return None
    bbox = im.getchannel("A").getbbox()
    if bbox is None:
        return None
    im = im.crop(bbox)
    s = size / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=64)
def _font(path: str, px: int):
    from PIL import ImageFont
    return ImageFont.truetype(path, px)


def _word(text: str, font_path: str, px: int, color):
    """The word as an RGBA image cropped to its ink."""
    from PIL import Image, ImageDraw
    font = _font(font_path, px)
    l, t, r, b = font.getbbox(text)
    im = Image.new("RGBA", (r - l + 4, b - t + 4), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((2 - l, 2 - t), text, font=font, fill=(*color, 255))
    return im.crop(im.getchannel("A").getbbox())


def _place(rng, size: int, w: int, h: int, taken: list, margin: int = 6, tries: int = 60):
    """A free spot for a w x h box (no overlap with ``taken`` plus a margin, so OCR never reads
    two neighbouring words as one), or None."""
    if w > size - 2 or h > size - 2:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
        if all(x + w + margin <= a or a2 + margin <= x or y + h + margin <= b or b2 + margin <= y
               for a, b, a2, b2 in taken):
            return x, y
    return None


def compose(cfg: RiceConfig, cats: list[str], pool: dict[str, list[str]], seed: int, split: str, idx: int):
    """Scene ``idx`` of ``split``: (PNG bytes, caption, meta, items); items = [(box, kind, label, text)].
    The minimum numbers of drawings and words are placed first (one that finds no room is retried
    up to 3 times, smaller each time, with another drawing or word), the optional ones after, if
    there is room left."""
    from PIL import Image
    rng = np.random.default_rng([seed, SPLITS[split], idx])
    size = cfg.scene_size
    bg = tuple(int(v) for v in rng.integers(215, 256, 3))
    scene = Image.new("RGBA", (size, size), (*bg, 255))
    n_obj = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    n_word = int(rng.integers(cfg.words[0], cfg.words[1] + 1))
    plan = ([("object", 4)] * cfg.objects[0] + [("ocr", 4)] * cfg.words[0]  # (kind, tries)
            + [("ocr", 1)] * (n_word - cfg.words[0]) + [("object", 1)] * (n_obj - cfg.objects[0]))
    items, taken = [], []
    for kind, tries in plan:
        for t in range(tries):
            im, label = _item(cfg, cats, pool, rng, kind, shrink=0.8 ** t)
            if im is not None and (xy := _place(rng, size, im.width, im.height, taken)) is not None:
                scene.alpha_composite(im, xy)
                taken.append((xy[0], xy[1], xy[0] + im.width, xy[1] + im.height))
                items.append((taken[-1], kind, label, label if kind == "ocr" else ""))
                break
    data, ext = encode_image(scene.convert("RGB"), "png")
    objs = [lab for _, k, lab, _ in items if k == "object"]
    words = [lab for _, k, lab, _ in items if k == "ocr"]
    caption = " and ".join([", ".join(objs)] * bool(objs) + [f"the word{'s' * (len(words) > 1)} "
                                                           + " ".join(words)] * bool(words))
    meta = {"url": f"rice:{split}:{idx}", "source": "rice", "categories": objs, "words": words,
            "width": size, "height": size}
    return data, ext, caption, meta, items


def _item(cfg: RiceConfig, cats, pool, rng, kind: str, shrink: float):
    """(RGBA image, label) of a random drawing or word, ``shrink`` times its drawn size."""
    if kind == "ocr":
        word = cfg.vocabulary[int(rng.integers(len(cfg.vocabulary)))]
        color = tuple(int(v) for v in rng.integers(0, 90, 3))
        px = max(cfg.font_px[0] * 3 // 4, round(int(rng.integers(cfg.font_px[0], cfg.font_px[1] + 1)) * shrink))
        return _word(word, cfg.fonts[int(rng.integers(len(cfg.fonts)))], px, color), word
    cat = cats[int(rng.integers(len(cats)))]
    files = pool[cat]
    px = max(8, round(int(rng.integers(cfg.object_px[0], cfg.object_px[1] + 1)) * shrink))
    return _drawing(files[int(rng.integers(len(files)))], px), cat


def _compose_star(args):
    return compose(*args)


# ---------------------------------------------------------------- shards

def _box_table(keys: list[str], items: list[list], gt: bool) -> pa.Table:
    """The external box format (``gt``: probe ground truth, every box with its label)."""
    rows = [[it for it in its if gt or it[1] == "object"] for its in items]
    cols = {"key": pa.array(keys, pa.string()),
            "boxes": pa.array([[[float(v) for v in it[0]] for it in r] for r in rows],
                              pa.list_(pa.list_(pa.float32()))),
            "kind": pa.array([[it[1] for it in r] for r in rows], pa.list_(pa.string()))}
    if gt:
        cols["label"] = pa.array([[it[2] for it in r] for r in rows], pa.list_(pa.string()))
    else:
        cols["text"] = pa.array([[it[3] for it in r] for r in rows], pa.list_(pa.string()))
    return pa.table(cols)


def write_split(split: str, n: int, folder: Path, box_path, cats, pool, seed: int, per_shard: int,
                workers: int, cfg: RiceConfig) -> dict:
    """Shards of ``n`` scenes; each shard's box parquet (``box_path(s)``) before its stats marker."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (n + per_shard - 1) // per_shard
    todo = [s for s in range(n_shards) if not ShardWriter.is_complete(folder, s)]
    counts = {"scenes": n, "shards": n_shards, "objects": 0, "words": 0}
    with ProcessPoolExecutor(workers) if workers > 1 else InlinePool() as ex:
        bar = tqdm(total=n, desc=f"rice {split}", unit="scene", file=sys.stderr, disable=None)
        bar.update(min(n, (n_shards - len(todo)) * per_shard))
        for s in todo:
            idx = range(s * per_shard, min(n, (s + 1) * per_shard))
            w, keys, items = ShardWriter(folder, s), [], []
            args = [(cfg, cats, pool, seed, split, i) for i in idx]
            for i, (data, ext, caption, meta, its) in zip(idx, ex.map(_compose_star, args, chunksize=16)):
                key = f"{s:05d}{i - idx.start:04d}"
                w.write(key, data, ext, caption, meta)
                keys.append(key)
                items.append(its)
                bar.update(1)
            with atomic_path(box_path(s)) as tmp:
                pq.write_table(_box_table(keys, items, gt=split != "train"), tmp)
            w.close({"objects": sum(it[1] == "object" for its in items for it in its),
                     "words": sum(it[1] == "ocr" for its in items for it in its)})
        bar.close()
    for s in range(n_shards):  # counts from the shards' stats, also those an earlier run wrote
        st = json.loads((folder / f"{s:05d}_stats.json").read_text())
        counts["objects"] += st["objects"]
        counts["words"] += st["words"]
    return counts


def build(run, data) -> dict:
    """All rice splits under ``{data.out_dir}/rice`` (``data``: the ``data`` section)."""
    cfg: RiceConfig = data.rice
    out = Path(data.out_dir) / "rice"
    cats, pools = clipart_pools(cfg, data.openclipart_dir)
    atomic_write_json(out / "classes.json", {"objects": cats, "words": list(cfg.vocabulary)})
    per, summary = data.samples_per_shard, {}
    summary["train"] = write_split("train", cfg.pool_scenes, out / "train",
                                   lambda s: out / "boxes" / f"{s:05d}.parquet",
                                   cats, pools["train"], run.seed, per, data.workers, cfg)
    for name, n in (("train", cfg.probe_train), ("test", cfg.probe_test)):
        folder = out / "probe" / name
        summary[f"probe/{name}"] = write_split(f"probe/{name}", n, folder,
                                               lambda s, f=folder: f / f"gt_{s:05d}.parquet",
                                               cats, pools[f"probe/{name}"], run.seed, per, data.workers, cfg)
    atomic_write_json(out / "manifest.json", summary)
    return summary


def make_scenes(run, data) -> dict:
    """The `data-rice` stage: the scenes from the `data` section (its `data.rice` part)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # what the scenes depend on (not data.workers, nor the `mlcd data demo` fields)
    used = {"samples_per_shard": data.samples_per_shard, "openclipart_dir": data.openclipart_dir,
            "rice": to_dict(data.rice)}
    out = prepare_out_dir(Path(data.out_dir) / "rice", run, {"run": run, "data": used}, "data_rice")
    if run.overwrite:  # start over: finished shards of another config must not be kept
        for sub in ("train", "boxes", "probe"):
            shutil.rmtree(out / sub, ignore_errors=True)
    try:
        summary = build(run, data)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    for name, s in summary.items():
        log.info("rice %-12s %5d scenes in %3d shards: %d objects, %d words", name, s["scenes"],
                 s["shards"], s["objects"], s["words"])
    return summary


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("data-rice", make_scenes, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("data-rice")
