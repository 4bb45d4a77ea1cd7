"""Stage 3 input benchmark (`make bench` runs it from training/bench_train.py, next to the model's
samples/s): can the training data loader keep a GPU busy?

Real webdataset shards built from the demo data (`pipeline.demo_data` at debug sizes, images
stored as JPEG with the longest side at 256 px, like img2dataset's LAION-400M shards), a metadata
part and a random label part per shard (int32 N x 8, the label store's layout), then
training/data.py's loader exactly as the Trainer builds it: tar read + JPEG decode (stage 1's
decoder) + random resized crop to 224 px + flip + normalize + the label join, batches of 64.
Measured with 1 and with 2 DataLoader workers; images/s per worker is the per-core rate (each
worker is one process doing all the CPU work; the training process only receives batches). The
cores a GPU needs = its training rate / that per-core rate.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224       # crop output, as ViT-B/32-224 and ViT-L/14-224 train
STORED = 256     # longest side of the stored JPEGs (LAION-400M shards at 256 px)
BATCH = 64
# Anchor (derived in docs/SCALING.md, "Stage 3"): ViT-B/32-224 at 40% MFU on an A100 ~4,700
# samples/s per GPU; at 50% MFU on an H100 (the gpu-check's goal) 18,700.
ANCHORS = {"A100 40% MFU": 4_700, "H100 50% MFU": 18_700}


def build_data(tmp: Path) -> tuple[str, str, str, int, float]:
    """(shard spec, store dir, labels dir, samples, mean JPEG KB) from the demo data at debug sizes."""
    from pipeline import demo_data
    from pipeline.embed import read_samples
    from pipeline.io import atomic_save_npy
    from pipeline.shards import expand_shards
    demo_data.main(str(ROOT / "configs/debug.yaml"),
                   [f"run.out_dir={tmp}", f"data.image_size={STORED}", "data.workers=1"])
    shards = expand_shards(str(tmp / "data/train"))
    rng = np.random.default_rng(0)
    n, size = 0, 0
    for i, url in enumerate(shards):
        samples = list(read_samples(url))
        keys = [s["__key__"] for s in samples]
        size += sum(len(s.get("jpg", b"")) for s in samples)
        (tmp / "store/metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": keys}), tmp / f"store/metadata/metadata_{i}.parquet")
        atomic_save_npy(tmp / f"labels/labels_{i}.npy", rng.integers(0, 1000, (len(keys), 8), dtype=np.int32))
        n += len(keys)
    return str(tmp / "data/train"), str(tmp / "store"), str(tmp / "labels"), n, size / max(n, 1) / 1e3


def loader_rate(spec: str, store: str, labels: str, workers: int, batches: int) -> float:
    """images/s of the loader over `batches` batches after the first (worker start-up excluded)."""
    from training.data import TrainDataConfig, find_parts, make_loader
    cfg = TrainDataConfig(shards=spec, store=store, labels=labels, batch_size=BATCH, workers=workers,
                          shuffle_buffer=200, pin_memory=False)
    parts = find_parts(cfg, num_labels=8)
    it = iter(make_loader(parts, cfg, SIZE, 8, 1000, seed=0, rank=0, epoch=0, num_batches=batches + 1))
    images, lab, _ = next(it)
    assert images.shape == (BATCH, 3, SIZE, SIZE) and lab.shape == (BATCH, 8)
    t0 = time.perf_counter()
    n = sum(len(b[0]) for b in it)
    return n / (time.perf_counter() - t0)


def bench_loader(quick: bool, model_rate: float | None = None, model_config: str = "") -> list[dict]:
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    batches = 6 if quick else 24
    with tempfile.TemporaryDirectory() as d:
        spec, store, labels, n, kb = build_data(Path(d))
        rates = {w: loader_rate(spec, store, labels, w, batches * w) for w in (1, 2)}
    per_core = max(rates[1], rates[2] / 2)
    need = ", ".join(f"{name} ({r:,}/s): {r / per_core:.0f} cores" for name, r in ANCHORS.items())
    where = f"{cores} cores, load {load:.1f} at start"
    rows = [{"bench": "train loader images/s: 2 workers (ours) vs 1 worker (ref)",
             "config": f"{n} demo JPEGs <= {STORED} px ({kb:.1f} KB mean) -> crop {SIZE} px, batch {BATCH}",
             "ours": rates[2], "reference": rates[1], "unit": "images/s", "ratio": rates[2] / rates[1],
             "note": f"per core: {rates[1]:.0f} (1 worker), {rates[2] / 2:.0f} (2 workers); {where}"},
            {"bench": "cores per GPU for ViT-B/32-224 (anchor rate / loader per core)",
             "config": f"{per_core:.0f} images/s per core", "ours": ANCHORS["A100 40% MFU"] / per_core,
             "reference": ANCHORS["H100 50% MFU"] / per_core, "unit": "cores (A100 anchor; ref: H100)",
             "note": f"derived anchors, docs/SCALING.md: {need}"}]
    if model_rate:
        rows.append({"bench": "loader images/s per core vs the bench's training samples/s",
                     "config": model_config, "ours": per_core, "reference": model_rate, "unit": "samples/s",
                     "ratio": model_rate / per_core,
                     "note": "ratio = loader cores per training process of this step (its model is the "
                             "bench's small CPU one on synthetic inputs, not ViT-B/32-224)"})
    return rows
