"""Training data with regions (RICE): training/data.py's stream plus each image's boxes and labels.

The same seeded, resumable stream as training/data.py (LabeledStream: shards drawn with
replacement, shuffle buffer, per-batch generator seeded by (seed, rank, epoch, batch), resume by
fast-forward); this module only changes what a sample carries and how a batch is made:
- join: tar key -> image labels (image label store, as today: images without an image label row
  are skipped and counted, so the image loss always has targets) and -> its regions: region store
  part i (= shard i) `metadata_{i}.parquet` (`image_key`, `x0, y0, x1, y1` in stored-image
  pixels, `img_w`, `img_h`) row-aligned with the region label store's `labels_{i}.npy`. Regions
  whose label row is all -1 are dropped; an image without labeled regions is still used (its
  region rows are all invalid). A shard without a region part is used the same way (logged).
- no random crop (a crop would cut boxes): the whole image is resized to the model size (aspect
  not kept, boxes scaled per axis), then flipped with probability `hflip` (boxes mirrored).
- R = `per_image` region rows per image: a seeded random subset (kept in store order) when an
  image has more, padding (box 0, labels -1, valid false) when fewer.
Batches: training/data.py's Batch with the region fields set: boxes (B, R, 4) float32 in input
pixels, region_labels (B, R, L) int64, region_valid (B, R) bool.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.core import fs
from pipeline.core.config import check
from pipeline.core.images import decode_rgb
from pipeline.core.io import load_npy, read_json
from pipeline.core.shards import expand_shards
from pipeline.core.store import labels_path, meta_path, parquet_rows, read_parquet, read_parquet_schema
from training.data import Batch, LabeledStream, ShardPart, TrainDataConfig, find_parts, loader, to_tensor

log = logging.getLogger("mlcd.train.region_data")

BOX_COLUMNS = ("image_key", "x0", "y0", "x1", "y1", "img_w", "img_h")


@dataclass(frozen=True)
class RegionSpec:
    """Where the regions are and how many a batch takes (from train.regions)."""
    store: str        # region store: metadata/metadata_{i}.parquet (part i = shard i)
    labels: str       # region label store: labels_{i}.npy, row-aligned with the region metadata
    per_image: int    # R: region rows per image (fixed: equal shapes on every rank)
    num_labels: int   # L: label columns used per region
    num_classes: int  # region classes (label_space.json num_classes): every label must be below

    def __post_init__(self):
        check(self.per_image >= 1, "per_image", self.per_image, "must be >= 1")
        check(self.num_labels >= 1, "num_labels", self.num_labels, "must be >= 1")
        check(self.num_classes >= 1, "num_classes", self.num_classes, "must be >= 1")

    @classmethod
    def of(cls, regions, num_classes: int) -> RegionSpec:
        """From train.regions (training/config.py's RegionTrainConfig) and the region class count."""
        return cls(regions.store, regions.labels, regions.per_image, regions.num_labels, num_classes)


@dataclass(frozen=True)
class RegionPart(ShardPart):
    region_meta: str | None = None    # None: this shard has no region part (images only)
    region_labels: str | None = None


def find_region_parts(cfg: TrainDataConfig, regions: RegionSpec, num_labels: int = 1) -> list[RegionPart]:
    """find_parts (shards with image labels) + each one's region part, if complete (metadata and
    labels). Checks the first region label part's width against `regions.num_labels` (header)."""
    parts = find_parts(cfg, num_labels)
    index = {url: i for i, url in enumerate(expand_shards(cfg.shards))}
    out, missing = [], []
    for p in parts:
        i = index[p.url]
        m, lab = meta_path(regions.store, i), labels_path(regions.labels, i)
        if fs.isfile(m) and fs.isfile(lab):  # URLs kept whole (fs.url_of: pathlib folds s3://)
            out.append(RegionPart(p.url, p.meta, p.labels, fs.url_of(m), fs.url_of(lab)))
        else:
            out.append(RegionPart(p.url, p.meta, p.labels))
            missing.append(f"{p.url} (needs {fs.url_of(m if not fs.isfile(m) else lab)})")
    have = [p for p in out if p.region_meta]
    if not have:
        raise FileNotFoundError(f"no shard of {cfg.shards} has regions: expected {meta_path(regions.store, 0)} "
                                f"and {labels_path(regions.labels, 0)} (run mlcd regions, cluster/assign on "
                                f"the region store, and mlcd region-labels first)")
    if missing:
        log.warning("%d of %d shards have no region part; their images train the image loss only, e.g. %s",
                    len(missing), len(out), missing[0])
    for p in have:  # headers only: a wrong folder fails here, not in a DataLoader worker later
        _check_region_part(p, regions)
    return out


def _check_region_part(part: RegionPart, regions: RegionSpec) -> None:
    names = read_parquet_schema(part.region_meta).names
    lacking = [c for c in BOX_COLUMNS if c not in names]
    if lacking:
        raise ValueError(f"{part.region_meta}: region metadata lacks column(s) {', '.join(lacking)}")
    rows = parquet_rows(part.region_meta)
    shape = load_npy(part.region_labels, mmap=True).shape
    if len(shape) != 2 or shape[0] != rows:
        raise ValueError(f"{part.region_labels}: shape {shape} is not row-aligned with "
                         f"{part.region_meta} ({rows} rows)")
    if shape[1] < regions.num_labels:
        raise ValueError(f"{part.region_labels}: has {shape[1]} labels per row, "
                         f"train.regions.num_labels needs {regions.num_labels}")


def region_num_classes(labels: str | Path) -> int:
    """num_classes (clusters + tokens) from the region label store's label_space.json."""
    return LabelSpace.read(labels).num_classes


@dataclass
class LabelSpace:
    """label_space.json (clustering/region_labels.py): class c < K is cluster c; class K + j is
    token ``token_ids[j]`` (a CLIP BPE id) in a compact space, or token j itself in the full one."""
    clusters: int
    num_classes: int
    token_ids: list[int] | None  # compact space: CLIP id of class K + j; None: full vocabulary

    @classmethod
    def read(cls, labels: str | Path) -> LabelSpace:
        p = fs.join(labels, "label_space.json")
        if not fs.isfile(p):
            raise FileNotFoundError(f"{p}: region label space not found; run mlcd region-labels or set "
                                    f"train.regions.labels")
        js = read_json(p)
        n, k, ids = js.get("num_classes"), js.get("clusters", 0), js.get("token_ids")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{p}: num_classes={n!r} must be an int >= 1")
        if ids is not None and (not isinstance(ids, list) or not isinstance(k, int) or k + len(ids) != n
                                or not all(isinstance(t, int) and t >= 0 for t in ids)):
            raise ValueError(f"{p}: token_ids must list one CLIP id per token class "
                             f"(clusters {k} + {len(ids) if isinstance(ids, list) else ids!r} != num_classes {n})")
        return cls(int(k), n, ids)

    def decode(self, label: int) -> tuple[str, int]:
        """("cluster", id) or ("token", CLIP id) of one class."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        if label < self.clusters:
            return "cluster", int(label)
        j = label - self.clusters
        return "token", int(self.token_ids[j] if self.token_ids is not None else j)


def load_part_regions(part: RegionPart, regions: RegionSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image key -> (boxes (n, 4) float32 relative to the stored image, in [0, 1]; labels (n, L)
    int64) of its labeled regions, in store order."""
    _check_region_part(part, regions)  # files may have changed since start-up
    t = read_parquet(part.region_meta, columns=list(BOX_COLUMNS))
    labels = load_npy(part.region_labels)
    labels = labels[:, :regions.num_labels].astype(np.int64)
    if labels.size and labels.max() >= regions.num_classes:
        raise ValueError(f"{part.region_labels}: label {labels.max()} >= region num_classes "
                         f"{regions.num_classes}")
    col = {c: t.column(c).to_numpy(zero_copy_only=False) for c in BOX_COLUMNS}
    wh = np.stack([col["img_w"], col["img_h"]], 1).astype(np.float32)
    if (wh <= 0).any():
        raise ValueError(f"{part.region_meta}: img_w/img_h must be > 0")
    rel = np.stack([col["x0"], col["y0"], col["x1"], col["y1"]], 1).astype(np.float32) / np.tile(wh, 2)
    rel = np.clip(rel, 0.0, 1.0)
    keep = (labels >= 0).any(1)
    keys = col["image_key"].astype(str)[keep]
    rel, labels = rel[keep], labels[keep]
    uniq, inv = np.unique(keys, return_inverse=True)
    order = np.argsort(inv, kind="stable")  # rows grouped by image, store order within an image
    cuts = np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1]
    return {str(k): (rel[rows], labels[rows]) for k, rows in zip(uniq, np.split(order, cuts))}


class RegionStream(LabeledStream):
    """LabeledStream whose samples carry their regions; batches as in the module doc."""

    def __init__(self, parts: list[RegionPart], cfg: TrainDataConfig, image_size: int, num_labels: int,
                 num_classes: int, regions: RegionSpec, seed: int, rank: int, epoch: int, num_batches: int,
                 start: int = 0):
        super().__init__(parts, cfg, image_size, num_labels, num_classes, seed, rank, epoch, num_batches, start)
        self.regions = regions

    def _load_part(self, part: RegionPart) -> dict:
        labels = super()._load_part(part)
        regions = load_part_regions(part, self.regions) if part.region_meta else {}
        return {k: (lab, regions.get(k)) for k, lab in labels.items()}

    def _batch(self, raw: list[tuple], rng: np.random.Generator) -> Batch:
        B, R, L, S = len(raw), self.regions.per_image, self.regions.num_labels, self.size
        images = []
        boxes = np.zeros((B, R, 4), np.float32)
        region_labels = np.full((B, R, L), -1, np.int64)
        valid = np.zeros((B, R), bool)
        for b, (data, (_, reg), *_) in enumerate(raw):
            img = decode_rgb(data).resize((S, S), Image.Resampling.BICUBIC)  # stage 1's decoder, whole image
            flip = rng.random() < self.cfg.hflip
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(to_tensor(img))
            if reg is None:
                continue
            rel, lab = reg
            n = len(rel)
            rows = np.sort(rng.choice(n, R, replace=False)) if n > R else np.arange(n)
            bx = rel[rows] * S
            if flip:
                bx[:, [0, 2]] = S - bx[:, [2, 0]]
            boxes[b, :len(rows)], region_labels[b, :len(rows)], valid[b, :len(rows)] = bx, lab[rows], True
        labels = torch.from_numpy(np.stack([r[1][0] for r in raw]))
        return Batch(torch.stack(images), labels, sum(r[2] for r in raw), torch.from_numpy(boxes),
                     torch.from_numpy(region_labels), torch.from_numpy(valid), [r[3] for r in raw])


def make_region_loader(parts: list[RegionPart], cfg: TrainDataConfig, image_size: int, num_labels: int,
                       num_classes: int, regions: RegionSpec, seed: int, rank: int, epoch: int,
                       num_batches: int, start: int = 0) -> DataLoader:
    """Batches start..num_batches-1 of `epoch` for this rank, in order (as make_loader)."""
    return loader(RegionStream(parts, cfg, image_size, num_labels, num_classes, regions, seed, rank, epoch,
                               num_batches, start), cfg)
