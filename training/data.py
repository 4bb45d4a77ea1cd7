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
Images: `decode_batch` (uint8 by default, normalised on the device; training/decode.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core import fs
from pipeline.core.config import RESUMABLE, check
from pipeline.core.guard import die_with_parent_fn
from pipeline.core.images import decode_rgb, image_bytes
from pipeline.core.io import load_npy
from pipeline.core.shards import expand_shards, read_samples
from pipeline.core.store import labels_path, meta_path, read_keys
from training import batch_pool, decode
from training.decode import crop_box
from training.model import CLIP_MEAN, CLIP_STD

log = logging.getLogger("mlcd.train.data")


@dataclass
class TrainDataConfig:
    shards: str = "${run.out_dir}/data/train"    # what stage 1 embedded (same list, same order)
    store: str = "${run.out_dir}/store"          # for metadata/metadata_{i}.parquet (keys)
    labels: str = "${run.out_dir}/clusters/labels"
    batch_size: int = 32          # per rank per micro-step
    workers: int = field(default=2, metadata=RESUMABLE)  # DataLoader workers per rank (0 = in the
    #                               training process); changes the stream (logged)
    epoch_batches: int = 0        # batches per rank per stream epoch; 0 = from the data (epoch_length)
    shuffle_buffer: int = 500
    crop_scale_min: float = 0.5   # RandomResizedCrop scale range [min, 1]
    hflip: float = 0.5
    pin_memory: bool = field(default=True, metadata=RESUMABLE)
    # workers reuse their shared-memory batches once the training process is done with them
    # (training/batch_pool.py; fast + decode=cpu): no new segment to fault in per batch
    pool_batches: bool = field(default=True, metadata=RESUMABLE)
    # fast: uint8 batches (normalised on the device: training.data.normalize_uint8), JPEG draft
    # when the crop allows, one antialiased-bicubic resize (training/decode.py); false = the
    # reference float path (PIL bicubic, CLIP-normalised in the worker), kept for the bench
    fast: bool = True
    decode: str = "cpu"           # gpu: JPEGs decoded in batches by torchvision on the GPU (needs fast)

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.epoch_batches >= 0, "epoch_batches", self.epoch_batches, "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", self.crop_scale_min, "must be in (0, 1]")
        check(0 <= self.hflip <= 1, "hflip", self.hflip, "must be in [0, 1]")
        check(self.decode in ("cpu", "gpu"), "decode", self.decode, "must be cpu or gpu")
        check(self.decode == "cpu" or self.fast, "decode", self.decode, "gpu needs train.data.fast=true")
        check(self.decode == "cpu" or torch.cuda.is_available(), "decode", self.decode,
              "gpu needs CUDA, and torch.cuda.is_available() is False here; use cpu")


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
        if fs.isfile(m) and fs.isfile(lab):
            parts.append(ShardPart(url, fs.url_of(m), fs.url_of(lab)))
        else:
            missing.append(f"{url} (needs {fs.url_of(m if not fs.isfile(m) else lab)})")
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


# Auto epoch cap, samples per rank: resuming mid-epoch reads (never decodes) the epoch's earlier
# samples, so this bounds a resume's extra reading (~65k samples); each epoch start refills the
# shuffle buffer (shuffle_buffer x workers reads, ~1.5% of an epoch at the defaults).
AUTO_EPOCH_SAMPLES = 65_536


def epoch_length(cfg: TrainDataConfig, parts: list[ShardPart]) -> int:
    """Micro-batches per rank in one stream epoch: ``epoch_batches`` if set, else one pass over
    the parts' label rows (their .npy headers only) in batches of ``batch_size``, capped at
    AUTO_EPOCH_SAMPLES per rank. A function of the data alone, never of checkpointing, so
    changing ``train.checkpoint.*`` or the time budget on resume keeps the stream."""
    if cfg.epoch_batches:
        return cfg.epoch_batches
    rows = sum(int(load_npy(p.labels, mmap=True).shape[0]) for p in parts)
    return max(1, min(math.ceil(rows / cfg.batch_size), AUTO_EPOCH_SAMPLES // cfg.batch_size))


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


def decode_image(data: bytes, size: int, cfg: TrainDataConfig, rng: np.random.Generator) -> torch.Tensor:
    """Stage 1's decoder (pipeline/core/images.py: EXIF, 16-bit, palette+alpha repairs), then a random
    resized crop and flip. Samples stage 1 could not decode have no labels and never get here."""
    img = decode_rgb(data, max_aspect=0)  # stage 1 applied its caps; the crop bounds the resize
    w, h = img.size
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=crop_box(w, h, cfg.crop_scale_min, rng))
    if rng.random() < cfg.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, CLIP-normalized."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@dataclass
class Batch:
    """One micro-batch, as the loaders yield it and the loss heads read it (training/heads.py).
    images (B, 3, S, S): float CLIP-normalized, or uint8 (the trainer normalizes on the device);
    labels (B, l) image labels (-1 = none); skipped: unlabeled samples passed over to make it;
    the region fields (training/region_data.py) are None without train.regions; keys: the tar
    keys of the B samples (for debugging and tests; never sent to the device)."""
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0
    boxes: torch.Tensor | None = None          # (B, R, 4) float32, input pixels
    region_labels: torch.Tensor | None = None  # (B, R, L) int64, -1 = none
    region_valid: torch.Tensor | None = None   # (B, R) bool, False = padding
    keys: list[str] | None = None
    texts: torch.Tensor | None = None          # (B, T) int64 caption token ids (train.objective=clip)
    pool_slot: tuple[int, int, int] | None = None  # images in a worker's pooled segment (batch_pool.py)

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) pins a custom type only through this method (it passes a
        dataclass through unpinned otherwise): every tensor field pinned. A pooled batch's slot
        goes back to its worker once its images are copied (nothing reads the segment after)."""
        out = dataclasses.replace(self, pool_slot=None)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(out, f.name, v.pin_memory())
        batch_pool.give_back(self.pool_slot)
        return out


def normalize_uint8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> CLIP-normalized `dtype`: `to_tensor`'s math exactly
    (float32 /255, minus mean, over std; equal bit for bit, tests/test_decode.py), then the cast."""
    x = x.contiguous()  # fast batches are channels-last uint8 (decode.batch_buffer); the model gets NCHW
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return ((x.float() / 255.0 - mean) / std).to(dtype)


def decode_batch(datas: list[bytes], size: int, cfg: TrainDataConfig, rng: np.random.Generator,
                 out: torch.Tensor | None = None):
    """A batch's images: float32 CLIP-normalized (fast=false, the reference), uint8 (fast; into
    `out` when given), or still-encoded JPEGs + the CPU-decoded rest (decode=gpu; `loader`
    decodes them on the GPU)."""
    shared = get_worker_info() is not None  # a worker's batch goes to the training process
    if cfg.decode == "gpu":
        return decode.plan_batch(datas, size, cfg.crop_scale_min, cfg.hflip, rng, shared)
    if cfg.fast:
        return decode.decode_batch_cpu(datas, size, cfg.crop_scale_min, cfg.hflip, rng, shared=shared, out=out)
    return torch.stack([decode_image(b, size, cfg, rng) for b in datas])


class LabeledStream(IterableDataset):
    """Yields Batch(images, labels, skipped, keys) for one rank and one epoch (see module doc)."""

    # url -> samples: stage 1's reader (same samples, member cap); the loader bench's reference
    # stream swaps in the tarfile reader the loader had before (training/bench_data.py)
    read = staticmethod(read_samples)
    pool: batch_pool.BatchPool | None = None  # set by `loader` (batch_pool.Pooled) for workers

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

    def _batch(self, raw: list[tuple], rng: np.random.Generator) -> Batch:
        """raw: batch_size (image bytes, _load_part's value, skipped, key) -> the batch."""
        out, tag = self.pool.take(len(raw), self.size) if self.pool is not None else (None, None)
        images = decode_batch([r[0] for r in raw], self.size, self.cfg, rng, out)
        labels = torch.from_numpy(np.stack([r[1] for r in raw]))
        return Batch(images, labels, sum(r[2] for r in raw), keys=[r[3] for r in raw], pool_slot=tag)

    def _samples(self, rng: np.random.Generator):
        """Endless (image bytes, labels, skipped, key, caption bytes or None) of labeled samples, shards drawn with
        replacement, through a shuffle buffer; `skipped`: unlabeled ones passed over before it."""
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
            for s in self.read(part.url):
                lab = table.get(s["__key__"])
                img = image_bytes(s)
                if lab is None or img is None or "__skip__" in s:
                    skipped += 1
                    continue
                item = (img, lab, skipped, s["__key__"], s.get("txt"))  # caption: the CLIP head
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
                num_classes: int, seed: int, rank: int, epoch: int, num_batches: int, start: int = 0,
                device=None):
    """Batches start..num_batches-1 of `epoch` for this rank, in order (`device`: see `loader`)."""
    return loader(LabeledStream(parts, cfg, image_size, num_labels, num_classes, seed, rank, epoch,
                                num_batches, start), cfg, device)


PREFETCH = 2  # batches each worker makes ahead


def loader(ds: IterableDataset, cfg: TrainDataConfig, device: torch.device | str | None = None):
    """The DataLoader around a stream that batches itself (one place for workers/pinning). With
    decode=gpu, an iterable over it that decodes each batch's JPEGs on `device` (default: the
    current CUDA device) in this process (CUDA does not belong in forked workers)."""
    dl = DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                    pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                    persistent_workers=False, prefetch_factor=PREFETCH if cfg.workers else None,
                    worker_init_fn=die_with_parent_fn() if cfg.workers else None)
    if cfg.workers and cfg.pool_batches and cfg.fast and cfg.decode == "cpu" and isinstance(ds, LabeledStream):
        # slots per worker: its prefetched batches, the one it is making, and two the trainer may
        # hold (this step's, and the one whose release is checked at the next request); a trainer
        # that holds more (gradient accumulation) gets unpooled batches past that
        return batch_pool.Pooled(dl, ds, slots=PREFETCH + 3)
    if cfg.decode != "gpu":
        return dl
    return DeviceDecoded(dl, device or torch.device("cuda", torch.cuda.current_device()))


class DeviceDecoded:
    """Batches of a DataLoader whose `images` are an `EncodedBatch`, decoded on `device`."""

    def __init__(self, dl: DataLoader, device):
        self.dl, self.device = dl, device

    def __iter__(self):
        for b in self.dl:
            yield dataclasses.replace(b, images=decode.decode_on_device(b.images, self.device))


def num_classes_from_centroids(path: str | Path) -> int:
    """K from the k-means output's header (memory-mapped; no data read)."""
    p = Path(path)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{p}: k-means centroids not found; run stage 2 or set "
                                f"train.partial_fc.num_classes")
    return int(load_npy(p, mmap=True).shape[0])
