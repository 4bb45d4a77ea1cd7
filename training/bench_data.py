"""Stage 3 input benchmark (`make bench` runs it from training/bench_train.py, next to the model's
samples/s): can the training data loader keep a GPU busy?

Real webdataset shards built from the demo data (`pipeline.demo.demo_data` at debug sizes, images
stored as JPEG with the longest side at 256 px, like img2dataset's LAION-400M shards), a metadata
part and a random label part per shard (int32 N x 8, the label store's layout), then
training/data.py's loader exactly as the Trainer builds it: tar read + decode + random resized crop
to 224 px + flip + the label join, batches of 64.

Rows: (1) per core, the fast path (`train.data.fast=true`: uint8 batches, one antialiased-bicubic
resize, JPEG draft when the crop allows; training/decode.py) against today's reference
(`fast=false`: PIL bicubic, float32 CLIP-normalised in the loader), both with workers=0 and one
torch thread in this process, on the same shards and the same output shape (B, 3, 224, 224),
alternating reference/fast runs; (2) the same two with 1 DataLoader worker, per CPU second of the
worker and this process (what the hand-over to the training process adds); (3) the fast path with
1 and 2 workers, per wall second; (4) the cores a GPU needs = its training rate / the per-core rate. `loader_rate(decode, device, n)` is the entry
`make gpu-check` calls for `decode: cpu | gpu` (synthetic JPEG shards, no demo packages needed).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.data import LabeledStream

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224       # crop output, as ViT-B/32-224 and ViT-L/14-224 train
STORED = 256     # longest side of the stored JPEGs (LAION-400M shards at 256 px)
BATCH = 64
# Anchor (derived in docs/SCALING.md, "Stage 3"): ViT-B/32-224 at 40% MFU on an A100 ~4,700
# samples/s per GPU; at 50% MFU on an H100 (the gpu-check's goal) 18,700.
ANCHORS = {"A100 40% MFU": 4_700, "H100 50% MFU": 18_700}


def build_data(tmp: Path) -> tuple[str, str, str, int, float]:
    """(shard spec, store dir, labels dir, samples, mean JPEG KB) from the demo data at debug sizes."""
    from pipeline.core.io import atomic_save_npy
    from pipeline.core.shards import expand_shards, read_samples
    from pipeline.demo import demo_data
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


def tarfile_samples(url: str):
    """The loader's tar reading as it was when issue 21 was filed (pipeline/core/shards.py before
    commit baf88d7): Python's tarfile in stream mode, members grouped by key as `read_samples`
    groups them (same samples, same bytes; tests/test_bench_data.py). The reference stream of
    the per-core row reads with it, as "today's loader" did; without the old version's member
    cap and end-of-archive check, so it is, if anything, faster than the loader it stands for."""
    import tarfile

    from pipeline.core.shards import group_members, open_shard
    raw = open_shard(url)
    try:
        with tarfile.open(fileobj=raw, mode="r|*") as tf:
            def members():
                for info in tf:
                    if info.isreg():
                        yield info.name, tf.extractfile(info).read()  # type: ignore[union-attr]  # regular
                        tf.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise
            yield from group_members(members())
    finally:
        raw.close()


# per-core series: (fast path?, tar reader, DataLoader workers, train.data.pool_batches);
# "reference" is the loader as issue 21 found it (Pillow float path + tarfile), "float path" the
# same decode on today's reader
SERIES = {"fast": (True, "read_samples", 0, True), "reference": (False, "tarfile", 0, True),
          "float path": (False, "read_samples", 0, True),
          "fast, 1 worker": (True, "read_samples", 1, True), "reference, 1 worker": (False, "tarfile", 1, True),
          "fast, 1 worker, unpooled": (True, "read_samples", 1, False)}


def _stream(spec: str, store: str, labels: str, workers: int, batches: int, fast: bool,
            reader: str = "read_samples", decode: str = "cpu", pool: bool = True):
    """(the trainer's LabeledStream over the bench shards, its config); `reader`: read_samples or
    tarfile (`tarfile_samples`). With workers, a `_Stamped` one (batches come with the worker's
    CPU stamps; decode=gpu runs with workers=0 here: its device step takes batches, not tuples)."""
    from training.data import TrainDataConfig, find_parts
    cfg = TrainDataConfig(shards=spec, store=store, labels=labels, batch_size=BATCH, workers=workers,
                          shuffle_buffer=200, pin_memory=False, pool_batches=pool, fast=fast, decode="cpu")
    cfg.decode = decode  # after validation: the caller has the device (CPU rehearsal of the gpu path)
    ds = (_Stamped if workers else LabeledStream)(find_parts(cfg, num_labels=8), cfg, SIZE, 8, 1000, seed=0,
                                                   rank=0, epoch=0, num_batches=batches + 1)
    if reader == "tarfile":
        ds.read = tarfile_samples  # type: ignore[assignment]  # an instance's own reader (no member cap)
    return ds, cfg


def _rate(spec: str, store: str, labels: str, workers: int, batches: int, fast: bool = True,
          decode: str = "cpu", device=None, per_cpu_second: bool = False,
          faults: list[float] | None = None, reader: str = "read_samples", pool: bool = True) -> float:
    """images/s of the loader over `batches` batches after the first (worker start-up excluded):
    per wall second, or per CPU second (`per_cpu_second`: other jobs on the box barely change
    it) of the processes that did the work: this one, plus the worker's (stamped on each batch
    as it is made) with workers=1, which then also pays the hand-over to this process: a batch
    not already in shared memory is copied into a new segment (38.5 MB float32 for the
    reference, 9.6 MB uint8 for the fast path at B = 64). `faults`: minor page faults per image
    of the process that decodes; `pool`: train.data.pool_batches (workers reuse their batches)."""
    from training.data import loader
    assert not per_cpu_second or workers <= 1, "CPU seconds of one worker at most"
    ds, cfg = _stream(spec, store, labels, workers, batches, fast, reader, decode, pool)
    it = iter(loader(ds, cfg, device))
    first, w0, f0 = _unstamp(next(it))
    assert first.images.shape == (BATCH, 3, SIZE, SIZE) and first.labels.shape == (BATCH, 8)
    assert first.images.dtype == (torch.uint8 if fast else torch.float32)
    t0, c0, n, w, f = time.perf_counter(), time.process_time(), 0, w0, f0
    for item in it:
        b, w, f = _unstamp(item)
        n += len(b.labels)
    if decode == "gpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if faults is not None:
        faults.append((f - f0) / max(n, 1))
    if workers:
        cpu += w - w0  # the worker's stamps; this process's own `cpu` received the batches
    return (n / cpu) if per_cpu_second else (n / wall)


def _unstamp(item):
    """(batch, CPU seconds, minor faults): `_Stamped`'s tuple, or a batch with this process's."""
    if isinstance(item, (tuple, list)):  # a worker's tuple arrives as a list (DataLoader's default_convert)
        return tuple(item)
    return item, time.process_time(), _minflt()


class _Stamped(LabeledStream):
    """The trainer's stream, each batch yielded with the CPU seconds and minor page faults of the
    process that made it (in a worker: numbers the training process cannot read otherwise)."""

    def __iter__(self):
        for b in super().__iter__():
            yield b, time.process_time(), _minflt()


def _minflt() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def per_core_rates(spec: str, store: str, labels: str, batches: int, rounds: int,
                   faults: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """The `SERIES` alternating, one torch thread, images per CPU second = images/s per core.
    `faults`: minor page faults per image, per run, of the process that decodes. They move the
    float path's rate: its float32 images and 38 MB batch come from fresh mmaps (~150-400 faults
    an image, ~25% of its time) until glibc has raised its mmap threshold, which a process that
    has freed large tensors (a trainer, `make bench` after its loss rows) has done; a worker that
    hands each batch on keeps paying them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {k: [] for k in SERIES}
    faults = {} if faults is None else faults
    try:
        for fast in (False, True):  # warm-up, untimed: the first run of the process paid lazy
            _rate(spec, store, labels, 0, 1, fast=fast)  # imports and cold caches
        for _ in range(rounds):
            for name, (fast, reader, workers, pool) in SERIES.items():
                rates[name].append(_rate(spec, store, labels, workers, batches, fast=fast, per_cpu_second=True,
                                         faults=faults.setdefault(name, []), reader=reader, pool=pool))
    finally:
        torch.set_num_threads(threads)
    return rates


def bench_loader(quick: bool, model_rate: float | None = None, model_config: str = "",
                 costs: bool = False) -> list[dict]:
    """The loader rows; `costs`: also `fast_path_costs` on the same shards (a breakdown row)."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    batches, rounds = (4, 3) if quick else (12, 5)
    with tempfile.TemporaryDirectory() as d:
        spec, store, labels, n, kb = build_data(Path(d))
        flt: dict[str, list[float]] = {}
        pc = per_core_rates(spec, store, labels, batches, rounds, flt)
        workers = {w: _rate(spec, store, labels, w, batches * w) for w in (1, 2)}
        parts = fast_path_costs(spec, rounds=5) if costs else None
    med = {k: float(np.median(v)) for k, v in pc.items()}
    per_core = max(med["fast"], med["fast, 1 worker"], workers[1], workers[2] / 2)
    need = ", ".join(f"{name} ({r:,}/s): {r / per_core:.0f} cores" for name, r in ANCHORS.items())
    where = f"{cores} cores, load {load:.1f} at start"
    data = f"{n} demo JPEGs <= {STORED} px ({kb:.1f} KB mean) -> crop {SIZE} px, batch {BATCH}"

    def per_core_row(fast: str, ref: str, bench: str, how: str, note: str) -> dict:
        ratios = [f / r for f, r in zip(pc[fast], pc[ref])]
        return {"bench": f"train loader images/s per core, {bench}",
                "config": f"{data}; {how}, 1 thread, per CPU second, {rounds} alternating runs (median)",
                "ours": med[fast], "reference": med[ref], "unit": "images/s", "ratio": med[fast] / med[ref],
                "note": f"{note}ratio per run {min(ratios):.2f}-{max(ratios):.2f}; page faults per image "
                        f"(median) ours {np.median(flt[fast]):.0f}, ref {np.median(flt[ref]):.0f}; {where}"}
    rows = [per_core_row("fast", "reference", "fast path (ours) vs the loader as issue 21 found it (ref: "
                         "Pillow float path, tarfile reader)", "workers=0: all in the training process",
                         "target >= 4; "),
            per_core_row("fast", "float path", "fast path (ours) vs the float path on today's tar reader "
                         "(ref)", "workers=0", "what the image path alone gives (same reader both sides); "),
            per_core_row("fast, 1 worker", "reference, 1 worker", "1 DataLoader worker as the trainer runs "
                         "it: fast path (ours) vs the loader as issue 21 found it (ref)",
                         "1 worker: its CPU seconds + the training process's",
                         "both sides also hand each batch to the training process (the fast one in a "
                         "reused shared-memory batch, the reference's float32 one copied into a new "
                         "segment); "),
            per_core_row("fast, 1 worker", "fast, 1 worker, unpooled", "1 DataLoader worker, fast path: "
                         "batches reused (ours, train.data.pool_batches) vs a new shared batch each (ref)",
                         "1 worker: its CPU seconds + the training process's",
                         "what reusing the worker's shared-memory batches saves; "),
            {"bench": "train loader images/s, fast path: 2 workers (ours) vs 1 worker (ref)",
             "config": data, "ours": workers[2], "reference": workers[1], "unit": "images/s",
             "ratio": workers[2] / workers[1],
             "note": f"per core: {workers[1]:.0f} (1 worker), {workers[2] / 2:.0f} (2 workers); {where}"},
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
    if parts is not None:
        rows.append({"bench": "fast path, us per image (best of 5)", "config": data, **parts})
    return rows


def synthetic_data(tmp: Path, n: int, seed: int = 0) -> tuple[str, str, str]:
    """(shard spec, store, labels): `n` smooth random JPEGs <= 256 px in one shard, plus a few
    PNGs, a grayscale and an EXIF-rotated JPEG (the CPU fallback of decode=gpu), with labels."""
    import io

    from PIL import Image, ImageFilter

    from pipeline.core.io import atomic_save_npy
    from pipeline.core.shards import ShardWriter
    rng = np.random.default_rng(seed)
    w = ShardWriter(tmp / "data", 0)
    for i in range(n):
        side = int(rng.integers(150, STORED + 1))
        wh = (STORED, side) if i % 2 else (side, STORED)
        a = rng.integers(0, 256, (wh[1] // 8, wh[0] // 8, 3), dtype=np.uint8)
        im = Image.fromarray(a).resize(wh, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))
        buf, fmt, kw = io.BytesIO(), "JPEG", {"quality": 85}
        if i % 50 == 7:
            fmt, kw = "PNG", {}
        elif i % 50 == 13:
            im = im.convert("L")
        elif i % 50 == 21:
            exif = Image.Exif()
            exif[0x0112] = 6
            kw["exif"] = exif  # type: ignore[assignment]
        im.save(buf, fmt, **kw)
        w.write(f"{i:06d}", buf.getvalue(), "png" if fmt == "PNG" else "jpg", "x", {})
    w.close()
    (tmp / "store/metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(n)]}), tmp / "store/metadata/metadata_0.parquet")
    atomic_save_npy(tmp / "labels/labels_0.npy", rng.integers(0, 1000, (n, 8), dtype=np.int32))
    return str(tmp / "data"), str(tmp / "store"), str(tmp / "labels")


def loader_rate(decode: str = "cpu", device: str = "cpu", n: int = 1024) -> dict:
    """For `make gpu-check`: the fast loader's images/s with `decode` (cpu | gpu on `device`) over
    `n` images (workers=0: the decode itself, not the worker count), and the pixel difference on
    one batch (uint8 levels): vs the CPU fast path, and vs the reference float path."""
    with tempfile.TemporaryDirectory() as d:
        spec, store, labels = synthetic_data(Path(d), max(n // 4, 2 * BATCH))
        batches = max(n // BATCH, 2)
        rate = _rate(spec, store, labels, 0, batches, decode=decode, device=device)
        diff = pixel_diffs(spec, decode, device)
    return {"decode": decode, "device": str(device), "images_per_s": rate, "images": batches * BATCH,
            **diff}


def pixel_diffs(spec: str, decode: str, device) -> dict:
    """One batch of the shard's first samples through each path, same generator seed."""
    from pipeline.core.images import image_bytes
    from pipeline.core.shards import expand_shards, read_samples
    from training import decode as D
    from training.data import CLIP_MEAN, CLIP_STD, TrainDataConfig, decode_batch
    raw = [b for s, _ in zip(read_samples(expand_shards(spec)[0]), range(BATCH)) if (b := image_bytes(s)) is not None]
    cfg = TrainDataConfig(fast=False)
    seed = 3
    ref = decode_batch(raw, SIZE, cfg, np.random.default_rng(seed))
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    ref = ((ref * std + mean) * 255).round()
    cpu = D.decode_batch_cpu(raw, SIZE, cfg.crop_scale_min, cfg.hflip, np.random.default_rng(seed)).float()
    out = {"pixel_max_abs_diff_vs_reference": float((cpu - ref).abs().max()),
           "pixel_mean_abs_diff_vs_reference": float((cpu - ref).abs().mean())}
    if decode == "gpu":
        enc = D.plan_batch(raw, SIZE, cfg.crop_scale_min, cfg.hflip, np.random.default_rng(seed))
        gpu = D.decode_on_device(enc, device).cpu().float()
        out.update(pixel_max_abs_diff_vs_cpu=float((gpu - cpu).abs().max()),
                   pixel_mean_abs_diff_vs_cpu=float((gpu - cpu).abs().mean()),
                   cpu_fallback_samples=len(raw) - len(enc.jpegs))
    return out


def fast_path_costs(spec: str, rounds: int = 3) -> dict[str, float]:
    """Microseconds per image (CPU time, 1 torch thread, best of `rounds`) of the fast path's
    parts on `spec`'s JPEGs: tar reading, header + plan, decode_jpeg, the resize (crop, mirror,
    written in place into the channels-last batch), allocating and first writing new batches of
    BATCH rows as the loader does (the resize row reuses one), and the whole `decode_batch_cpu`
    in batches of BATCH. Where to look next, not a ratio."""
    from pipeline.core.images import image_bytes
    from pipeline.core.shards import expand_shards, read_samples
    from training import decode as D
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    urls = expand_shards(spec)
    raw = [b for u in urls for s in read_samples(u) if (b := image_bytes(s)) is not None and b[:3] == D.JPEG_MAGIC]
    rng = np.random.default_rng(0)
    opened = [D.open_and_plan(d, SIZE, 0.5, 0.5, rng) for d in raw]
    D.decode_batch_cpu(raw[:8], SIZE, 0.5, 0.5, rng)  # warm-up: lazy imports
    full = [x for x in map(D._decode_jpeg, raw) if x is not None]  # the op the fast path calls
    assert len(full) == len(raw), "a bench JPEG that decode_jpeg refuses"
    out = D.batch_buffer(len(raw), SIZE)

    def resize():
        for i, (x, (_, _, p)) in enumerate(zip(full, opened)):
            D.resize_crop(x[None], p.box, p.flip, SIZE, out=out[i])
    def per_batch(fn):  # as the loader: one batch of BATCH at a time, each dropped before the next
        def run():      # (one len(raw)-row buffer, or all batches kept, is mmap-fresh: 12x the cost)
            for i in range(0, len(raw), BATCH):
                fn(raw[i:i + BATCH])
        return run
    parts = {"tar read": lambda: [s for u in urls for s in read_samples(u)],
             "header + plan": lambda: [D.open_and_plan(d, SIZE, 0.5, 0.5, rng) for d in raw],
             "decode_jpeg": lambda: [D._decode_jpeg(d) for d in raw],
             "resize into the batch": resize,
             "a new batch, first touch": per_batch(lambda c: D.batch_buffer(len(c), SIZE).fill_(0)),
             "decode_batch_cpu (all but tar)": per_batch(lambda c: D.decode_batch_cpu(c, SIZE, 0.5, 0.5, rng))}
    best = {k: math.inf for k in parts}
    try:
        for _ in range(rounds):  # interleaved: each part sees the same drift of the machine's load
            for k, fn in parts.items():
                c = time.process_time()
                fn()
                best[k] = min(best[k], (time.process_time() - c) / len(raw) * 1e6)
    finally:
        torch.set_num_threads(threads)
    return {k: round(v, 1) for k, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    """`python -m training.bench_data [--quick]`: the loader rows of `make bench` alone (the same
    `bench_loader`), then `fast_path_costs` on the same kind of shards."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m training.bench_data")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    for row in bench_loader(args.quick, costs=True):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
