"""Training data: webdataset image shards joined by key with stage 2's labels.

Part i of the stores is the i-th shard of the expanded (sorted) shard list; `labels_{i}.npy` is
row-aligned with the embedding store's `metadata_{i}.parquet`, whose `key` column names the tar
sample. Samples without labels (a -1 row, or a key missing from the metadata) are skipped and
counted; shards without a label part are left out at start-up (logged).

Resumable from (seed, step) alone, with no iterator state: the stream is cut into "epochs" of a
fixed number of batches per rank. Epoch e on rank r is made of `workers` slot streams; slot k
produces batches j = k, k + n, k + 2n, ... of the epoch, each from its own seeded resampled shard
stream (shards drawn with replacement, then a shuffle buffer). Augmentation of batch j uses a
generator seeded by (seed, rank, e, j). Resuming at batch j0 of an epoch rotates the slots over the
DataLoader workers (worker w takes slot (w + j0) % n, so the round-robin order still yields j0,
j0 + 1, ...) and fast-forwards each slot past its earlier batches without decoding images.
Changing `workers` or the world size changes the stream (not an error; logged by the trainer).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import check
from pipeline.images import decode_rgb, image_bytes
from pipeline.io import load_npy
from pipeline.shards import expand_shards
from pipeline.store import labels_path, meta_path, read_keys
from training.model import CLIP_MEAN, CLIP_STD

log = logging.getLogger("mlcd.train.data")


@dataclass
class TrainDataConfig:
    shards: str = "${run.out_dir}/data/train"    # what stage 1 embedded (same list, same order)
    store: str = "${run.out_dir}/store"          # for metadata/metadata_{i}.parquet (keys)
    labels: str = "${run.out_dir}/clusters/labels"
    batch_size: int = 32          # per rank per micro-step
    workers: int = 2              # DataLoader workers per rank (0 = in the training process)
    epoch_batches: int = 0        # batches per rank per stream epoch; 0 = checkpoint.every x grad_accum
    shuffle_buffer: int = 500
    crop_scale_min: float = 0.5   # RandomResizedCrop scale range [min, 1]
    hflip: float = 0.5
    pin_memory: bool = True

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.epoch_batches >= 0, "epoch_batches", self.epoch_batches, "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", self.crop_scale_min, "must be in (0, 1]")
        check(0 <= self.hflip <= 1, "hflip", self.hflip, "must be in [0, 1]")


@dataclass(frozen=True)
class ShardPart:
    url: str
    meta: str
    labels: str


def find_parts(cfg: TrainDataConfig, num_labels: int = 1) -> list[ShardPart]:
    """Shards that have both a metadata part and a label part (others are logged and left out).
    Checks the first label part's width against `num_labels` up front (header only)."""
    shards = expand_shards(cfg.shards)
    parts, missing = [], []
    for i, url in enumerate(shards):
        m, lab = meta_path(cfg.store, i), labels_path(cfg.labels, i)
        if m.is_file() and lab.is_file():
            parts.append(ShardPart(url, str(m), str(lab)))
        else:
            missing.append(f"{url} (needs {m if not m.is_file() else lab})")
    if missing:
        log.warning("%d of %d shards have no labels yet and are left out, e.g. %s",
                    len(missing), len(shards), missing[0])
    if not parts:
        raise FileNotFoundError(f"no shard of {cfg.shards} has labels: expected {labels_path(cfg.labels, 0)} "
                                f"and {meta_path(cfg.store, 0)} (run stages 1 and 2 first)")
    width = load_npy(parts[0].labels, mmap=True).shape
    if len(width) != 2 or width[1] < num_labels:
        raise ValueError(f"{parts[0].labels}: shape {width}, but loss.num_labels needs {num_labels} "
                         f"labels per row")
    return parts


def load_part_labels(part: ShardPart, num_labels: int, num_classes: int) -> dict[str, np.ndarray]:
    """key -> its first `num_labels` labels (int64), for rows that have any."""
    keys = read_keys(part.meta)
    labels = load_npy(part.labels)
    if labels.ndim != 2 or labels.shape[0] != len(keys):
        raise ValueError(f"{part.labels}: shape {labels.shape} is not row-aligned with {part.meta} "
                         f"({len(keys)} rows)")
    if labels.shape[1] < num_labels:
        raise ValueError(f"{part.labels}: has {labels.shape[1]} labels per row, loss.num_labels "
                         f"needs {num_labels}")
    labels = labels[:, :num_labels].astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{part.labels}: label {labels.max()} >= num_classes {num_classes}")
    return {k: labels[i] for i, k in enumerate(keys) if labels[i, 0] >= 0}


def crop_box(w: int, h: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (scale [scale_min, 1], ratio [3/4, 4/3]), from `rng`."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    s = min(w, h)  # fallback: central square
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def decode_image(data: bytes, size: int, cfg: TrainDataConfig, rng: np.random.Generator) -> torch.Tensor:
    """Stage 1's decoder (pipeline/images.py: EXIF, 16-bit, palette+alpha repairs), then a random
    resized crop and flip. Samples stage 1 could not decode have no labels and never get here."""
    img = decode_rgb(data)
    w, h = img.size
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=crop_box(w, h, cfg.crop_scale_min, rng))
    if rng.random() < cfg.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, CLIP-normalized."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class LabeledStream(IterableDataset):
    """Yields (images, labels, skipped) batches for one rank and one epoch (see module doc)."""

    def __init__(self, parts: list[ShardPart], cfg: TrainDataConfig, image_size: int, num_labels: int,
                 num_classes: int, seed: int, rank: int, epoch: int, num_batches: int, start: int = 0):
        self.parts, self.cfg, self.size = parts, cfg, image_size
        self.num_labels, self.num_classes = num_labels, num_classes
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self.num_batches, self.start = num_batches, start
        self.slots = max(cfg.workers, 1)

    def _load_part(self, part: ShardPart) -> dict:
        """key -> what a batch needs of that sample (training/region_data.py adds its regions)."""
        return load_part_labels(part, self.num_labels, self.num_classes)

    def _batch(self, raw: list[tuple], rng: np.random.Generator) -> tuple:
        """raw: batch_size (image bytes, _load_part's value, skipped) -> the batch."""
        images = torch.stack([decode_image(b, self.size, self.cfg, rng) for b, _, _ in raw])
        labels = torch.from_numpy(np.stack([lab for _, lab, _ in raw]))
        return images, labels, sum(s for _, _, s in raw)

    def _samples(self, rng: np.random.Generator):
        """Endless (key, image bytes, labels) of labeled samples, shards drawn with replacement,
        through a shuffle buffer. Each yielded tuple carries how many unlabeled ones it skipped."""
        cache: dict[str, dict] = {}
        buf, skipped, dry = [], 0, 0
        while True:
            if dry > 4 * len(self.parts) + 20:  # every draw came back without a labeled sample
                raise ValueError(f"no labeled samples found in {len(self.parts)} shards (e.g. "
                                 f"{self.parts[0].url} with {self.parts[0].labels}): keys do not match "
                                 f"the metadata, or every label row is -1")
            part = self.parts[int(rng.integers(len(self.parts)))]
            if part.url not in cache:  # a few shards per worker: small
                if len(cache) >= 8:
                    cache.pop(next(iter(cache)))
                cache[part.url] = self._load_part(part)
            table = cache[part.url]
            dry += 1
            for s in wds.tarfile_samples([{"url": part.url}]):
                lab = table.get(s["__key__"])
                img = image_bytes(s)
                if lab is None or img is None:
                    skipped += 1
                    continue
                item = (img, lab, skipped)
                skipped, dry = 0, 0
                if len(buf) < self.cfg.shuffle_buffer:
                    buf.append(item)
                    continue
                i = int(rng.integers(len(buf)))
                buf[i], item = item, buf[i]
                yield item

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        slot = (wid + self.start) % self.slots
        samples = self._samples(np.random.default_rng([self.seed, self.rank, self.epoch, slot]))
        for j in range(slot, self.num_batches, self.slots):
            raw = [next(samples) for _ in range(self.cfg.batch_size)]
            if j < self.start:
                continue  # fast-forward: bytes read, nothing decoded
            yield self._batch(raw, np.random.default_rng([self.seed, self.rank, self.epoch, j, 1]))


def make_loader(parts: list[ShardPart], cfg: TrainDataConfig, image_size: int, num_labels: int,
                num_classes: int, seed: int, rank: int, epoch: int, num_batches: int, start: int = 0
                ) -> DataLoader:
    """Batches start..num_batches-1 of `epoch` for this rank, in order."""
    return loader(LabeledStream(parts, cfg, image_size, num_labels, num_classes, seed, rank, epoch,
                                num_batches, start), cfg)


def loader(ds: IterableDataset, cfg: TrainDataConfig) -> DataLoader:
    """The DataLoader around a stream that batches itself (one place for workers/pinning)."""
    return DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=2 if cfg.workers else None)


def num_classes_from_centroids(path: str | Path) -> int:
    """K from the k-means output's header (memory-mapped; no data read)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: k-means centroids not found; run stage 2 or set "
                                f"train.partial_fc.num_classes")
    return int(load_npy(p, mmap=True).shape[0])
