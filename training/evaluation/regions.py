"""Region-level evaluation (RICE): object-region recognition and OCR-word recognition from frozen
patch tokens, for several models.

    python -m training.evaluation.regions --config configs/rice_demo.yaml [eval_regions.key=value ...]
    torchrun --nproc_per_node 2 -m training.evaluation.regions --config ...   # extraction split over ranks

Data: probe scenes with ground truth (``eval_regions.train`` / ``.test``): ``{00000..}.tar``
(img2dataset layout) beside ``gt_{00000..}.parquet`` with columns ``key`` (the sample key),
``boxes`` ([x0, y0, x1, y1] in pixels of the stored image), ``kind`` ("object" | "ocr") and
``label`` (the object's category, or the word written in an OCR box).

Region feature, the same for every model so the comparison is fair (no region head needed): the
image goes through the model's own image processor (as ``mlcd eval`` preprocesses: shortest side
-> input size, center crop), its boxes through the same resize and crop; the feature is the mean
of the backbone's ``last_hidden_state`` patch tokens whose patch cell overlaps the box (positive
area; a box thinner than a cell still takes the cell holding its center; a box cropped out of the
input is dropped and counted), L2-normalized. Then, per task, the probes of ``mlcd eval``
(training/evaluation/probe.py) from probe/train to probe/test: (a) object regions -> category,
(b) OCR regions -> word. Test regions whose class never occurs in train cannot be predicted by
any probe; they are left out and counted (``unseen_test``).

Outputs in ``eval_regions.out_dir``: features cached per (model, split) with a fingerprint
(``features/<model>/regions_<split>.npy``: a rerun skips finished extraction and probes),
``results.json`` (every number) and ``results.md`` (model x {object linear, object k-NN, word
linear, word k-NN}, with counts), rewritten after each model. Cost: one forward pass per probe
image per model; the probes are small (regions x width).
"""
from __future__ import annotations

import logging
import math
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.core import fs
from pipeline.core.config import RESUMABLE, ConfigError, RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.images import is_image_name
from pipeline.core.io import atomic_write_json, atomic_write_text, read_json
from pipeline.core.shards import ShardSpecError, check_member_size, expand_shards
from pipeline.core.tracking import Tracker, progress
from training.evaluation import probe
from training.evaluation.evaluate import (
    FeatureCache,
    KnnConfig,
    LinearConfig,
    ModelSpec,
    _device,
    _hash,
    _model_key,
    _spec,
)
from training.evaluation.features import (
    EvalInputError,
    Extractor,
    LabeledImages,
    _key_ext,
    build_extractor,
    to_jsonable,
)

log = logging.getLogger("mlcd.eval_regions")

TASKS = {"object": "object", "word": "ocr"}   # task -> the region kind it reads
TOKEN_KINDS = ("checkpoint", "hf", "random")   # model kinds with a patch-token path


@dataclass
class RegionEvalConfig:
    out_dir: str = "${run.out_dir}/eval_regions"
    train: str = "${run.out_dir}/data/rice/probe/train"   # probe scenes: shards + gt_*.parquet
    test: str = "${run.out_dir}/data/rice/probe/test"
    models: list[ModelSpec] = field(default_factory=list, metadata=RESUMABLE)  # kinds: hf | random | checkpoint
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    val_fraction: float = 0.2       # of train, held out to choose C and k
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=lambda: KnnConfig(ks=[1, 5, 10, 20]))
    batch_size: int = field(default=32, metadata=RESUMABLE)
    workers: int = field(default=1, metadata=RESUMABLE)  # DataLoader workers per rank (decode + preprocess)
    device: str = field(default="auto", metadata=RESUMABLE)  # auto (cuda if present) | cpu | cuda

    def __post_init__(self):
        self.models = [_spec(ModelSpec, v, f"models.{i}") for i, v in enumerate(self.models)]
        names = [m.name for m in self.models]
        for i, m in enumerate(self.models):
            check(bool(m.name) and "/" not in m.name and m.name not in (".", ".."), f"models.{i}.name",
                  m.name, "must be a non-empty plain name (it names cache folders)")
            check(m.kind in TOKEN_KINDS, f"models.{i}.kind", m.kind,
                  f"must be one of {TOKEN_KINDS} (ViTs whose patch tokens are pooled per box)")
            check(m.kind == "random" or bool(m.path), f"models.{i}.path", m.path, f"required for kind={m.kind}")
            check(m.kind != "random" or bool(m.path or m.model), f"models.{i}", "random",
                  "needs `model` (ModelConfig fields) or `path` (architecture to copy)")
        check(len(set(names)) == len(names), "models", names, "names must be unique")
        check(bool(self.tasks) and set(self.tasks) <= set(TASKS), "tasks", self.tasks,
              f"must be a non-empty subset of {list(TASKS)}")
        check(bool(self.train and self.test), "train/test", (self.train, self.test), "both are required")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "must be in (0, 1)")
        check(len(self.linear.c_grid) > 0 and all(c > 0 for c in self.linear.c_grid),
              "linear.c_grid", self.linear.c_grid, "must be a non-empty list of C > 0")
        check(len(self.knn.ks) > 0 and all(k > 0 for k in self.knn.ks), "knn.ks", self.knn.ks,
              "must be a non-empty list of k > 0")
        check(self.knn.temperature > 0, "knn.temperature", self.knn.temperature, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "must be auto, cpu or cuda")


# ------------------------------------------------------------------------------------- scenes

@dataclass
class RegionSet:
    """Probe scenes (one row per image in ``images``) and their regions (one row per box)."""
    images: LabeledImages   # labels = image index (regions find their image's features by it)
    image: np.ndarray       # (R,) image row of each region
    boxes: np.ndarray       # (R, 4) float64 [x0, y0, x1, y1], stored-image pixels
    kind: list[str]
    label: list[str]

    def fingerprint(self) -> str:
        return _hash([self.images.fingerprint(), self.image.tolist(), self.boxes.tolist(), self.kind,
                      self.label])


def _tar_images(shard: str) -> dict[str, tuple[int, int]]:
    """key -> (byte offset, size) of the sample's image inside the tar."""
    out = {}
    try:
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.isfile() and is_image_name(m.name):
                    check_member_size(m, shard, EvalInputError)
                    out[_key_ext(m.name)[0]] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise EvalInputError(f"{shard}: cannot read shard ({e})") from None
    return out


def _gt_rows(gt: Path) -> list[dict]:
    if not gt.is_file():
        raise EvalInputError(f"missing ground truth {gt} (the probe scenes' boxes and labels)")
    try:
        table = pq.read_table(gt)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{gt}: unreadable ({e})") from None
    missing = [c for c in ("key", "boxes", "kind", "label") if c not in table.column_names]
    if missing:
        raise EvalInputError(f"{gt}: missing column(s) {missing} (has: {', '.join(table.column_names)})")
    return table.select(["key", "boxes", "kind", "label"]).to_pylist()


def open_regions(spec: str) -> RegionSet:
    """Probe scenes from a shard folder/spec; ``{stem}.tar`` pairs with ``gt_{stem}.parquet``."""
    try:
        shards = expand_shards(spec)
    except ShardSpecError as e:
        raise EvalInputError(f"region probe set {spec}: {e}") from None
    items, image, boxes, kind, label = [], [], [], [], []
    for shard in shards:
        gt = Path(shard).parent / f"gt_{Path(shard).stem}.parquet"
        members = _tar_images(shard)
        for row in _gt_rows(gt):
            key = str(row["key"])
            if key not in members:
                raise EvalInputError(f"{gt}: key {key!r} has no image in {shard}")
            b, k, lab = row["boxes"] or [], row["kind"] or [], row["label"] or []
            if not (len(b) == len(k) == len(lab)):
                raise EvalInputError(f"{gt}: key {key!r} has {len(b)} boxes, {len(k)} kinds, {len(lab)} labels")
            for box, kd in zip(b, k):
                if (kd not in TASKS.values() or len(box) != 4 or not np.all(np.isfinite(box))
                        or box[2] < box[0] or box[3] < box[1]):
                    raise EvalInputError(f"{gt}: key {key!r}: bad region kind={kd!r} box={box}")
            image += [len(items)] * len(b)
            boxes += [list(map(float, box)) for box in b]
            kind += [str(x) for x in k]
            label += [str(x) for x in lab]
            items.append((shard, *members[key]))
    if not boxes:
        raise EvalInputError(f"region probe set {spec}: no regions in its gt_*.parquet files")
    imgs = LabeledImages(str(spec), items, np.arange(len(items)), [])
    return RegionSet(imgs, np.asarray(image, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4),
                     kind, label)


# --------------------------------------------------------------------------- box -> patch cells

def _field(d, key: str):
    """A key of an HF size/crop spec: a plain dict (older transformers) or a ``SizeDict``."""
    return d.get(key) if hasattr(d, "get") else getattr(d, key, None)


def box_geometry(proc, w: int, h: int) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy): an image pixel x maps to x * sx - ox in the model input after the HF
    image processor's resize (shortest edge, or a fixed height x width) and center crop."""
    nw, nh = w, h
    size = getattr(proc, "size", None)
    if getattr(proc, "do_resize", False) and size is not None:
        if _field(size, "shortest_edge"):  # HF get_resize_output_image_size(default_to_square=False)
            s = int(_field(size, "shortest_edge"))
            long = int(s * max(w, h) / min(w, h))
            nw, nh = (s, long) if w <= h else (long, s)
        elif _field(size, "height") and _field(size, "width"):
            nw, nh = int(_field(size, "width")), int(_field(size, "height"))
    ox = oy = 0.0
    crop = getattr(proc, "crop_size", None)
    if getattr(proc, "do_center_crop", False) and crop is not None:
        ox, oy = float((nw - int(_field(crop, "width"))) // 2), float((nh - int(_field(crop, "height"))) // 2)
    return nw / w, nh / h, ox, oy


def cell_mask(boxes: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, grid_h, grid_w) bool: the patch cells each box (R, 4), input pixels) overlaps with
    positive area, or the cell holding its center when it overlaps none (thinner than a cell,
    or on a cell border); and (R,) kept: False where the box lies outside the input."""
    x0, y0, x1, y1 = boxes.unbind(1)
    lo_x = torch.arange(grid_w, dtype=boxes.dtype, device=boxes.device) * patch
    lo_y = torch.arange(grid_h, dtype=boxes.dtype, device=boxes.device) * patch
    cols = (lo_x[None] < x1[:, None]) & (lo_x[None] + patch > x0[:, None])   # (R, gw)
    rows = (lo_y[None] < y1[:, None]) & (lo_y[None] + patch > y0[:, None])   # (R, gh)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inside = (cx >= 0) & (cx < grid_w * patch) & (cy >= 0) & (cy < grid_h * patch)
    ci = (cx / patch).floor().clamp(0, grid_w - 1).long()
    ri = (cy / patch).floor().clamp(0, grid_h - 1).long()
    empty_c, empty_r = ~cols.any(1) & inside, ~rows.any(1) & inside
    cols[empty_c, ci[empty_c]] = True
    rows[empty_r, ri[empty_r]] = True
    kept = cols.any(1) & rows.any(1)
    return rows[:, :, None] & cols[:, None, :], kept


def pool_regions(grid: torch.Tensor, boxes: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) L2-normalized means of one image's patch tokens ``grid`` (gh, gw, C) over each
    box's cells (zeros for a dropped box), and (R,) kept."""
    gh, gw, c = grid.shape
    mask, kept = cell_mask(boxes.to(grid.device, torch.float64), gh, gw, patch)
    m = mask.reshape(len(boxes), gh * gw).to(grid.dtype)
    feats = (m @ grid.reshape(gh * gw, c)) / m.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(feats, dim=1) * kept[:, None], kept


# ---------------------------------------------------------------------------------- extraction

def _sized(transform):
    def tf(img):
        return transform(img), img.size
    return tf


def _collate(batch):
    return (torch.stack([b[0][0] for b in batch]), torch.tensor([b[0][1] for b in batch]),
            torch.tensor([b[1] for b in batch]))


def patch_mean_fn(ex: Extractor):
    """x, boxes per image (input pixels) -> per image (pooled features, kept): the feature every
    model has (mean of the patch tokens under the box)."""
    def fn(x, boxes):
        grid = ex.patch_tokens(x)  # (B, gh, gw, C)
        patch = x.shape[-1] // grid.shape[2]
        return [pool_regions(g, b, patch) for g, b in zip(grid, boxes)]
    return fn


def region_head_fn(ex: Extractor):
    """The same, from RICE's own region head (training/evaluation/region_head.py); kept is the
    pooled feature's (a box outside the input is dropped from both)."""
    from training.evaluation.region_head import head_features

    def fn(x, boxes):
        patch = ex.module.config.resolved().patch_size
        gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
        out = []
        for f, b in zip(head_features(ex, x, boxes), boxes):
            kept = cell_mask(b.to(torch.float64), gh, gw, patch)[1].to(f.device)
            out.append((f * kept[:, None], kept))
        return out
    return fn


def _image_features(ex: Extractor, rs: RegionSet, starts: np.ndarray, lo: int, hi: int,
                    batch_size: int, workers: int, device, desc: str, ctx: DistContext,
                    fn=None) -> torch.Tensor:
    """(regions of images [lo, hi), C + 1): features (``fn``: patch_mean_fn by default), then
    the kept flag."""
    fn = fn or patch_mean_fn(ex)
    sub = Subset(rs.images.with_transform(_sized(ex.transform)), range(lo, hi))
    loader = DataLoader(sub, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    out = []
    with progress(hi - lo, desc, ctx) as bar:
        for x, wh, idx in loader:
            boxes = []
            for (w, h), i in zip(wh.tolist(), idx.tolist()):
                sx, sy, ox, oy = box_geometry(ex.processor, w, h)
                boxes.append(torch.as_tensor(rs.boxes[starts[i]:starts[i + 1]]) * torch.tensor([sx, sy, sx, sy])
                             - torch.tensor([ox, oy, ox, oy]))
            for f, k in fn(x.to(device, non_blocking=True), boxes):
                out.append(torch.cat([f, k[:, None].to(f.dtype)], 1).cpu())
            bar.update(len(x))
    return torch.cat(out) if out else torch.zeros(0, 0)


def extract_regions(ex: Extractor, rs: RegionSet, ctx: DistContext, batch_size: int = 32, workers: int = 0,
                    device: torch.device | None = None, desc: str = "regions",
                    fn=None) -> tuple[np.ndarray, np.ndarray]:
    """(R, C) float32 region features in region order and (R,) kept, on every rank. Rank r takes
    the images [r*ceil(N/W), (r+1)*ceil(N/W)) (their regions are contiguous: regions are listed
    image by image); the padded blocks are all-gathered (one collective per split)."""
    device = device or ctx.device
    n, world = len(rs.images), ctx.world_size
    starts = np.searchsorted(rs.image, np.arange(n + 1))  # first region of each image
    per = math.ceil(n / world)
    bounds = [(min(r * per, n), min((r + 1) * per, n)) for r in range(world)]
    lo, hi = bounds[ctx.rank]
    local = _image_features(ex, rs, starts, lo, hi, batch_size, workers, device, desc, ctx, fn)
    if not ctx.distributed:
        return local[:, :-1].numpy(), local[:, -1].numpy() > 0
    counts = [int(starts[b] - starts[a]) for a, b in bounds]
    dim = int(ctx.all_reduce_(torch.tensor([local.shape[1]], device=device), "max"))
    buf = torch.zeros(max(counts), dim, dtype=torch.float32, device=device)
    buf[: len(local)] = local.to(device)
    full = ctx.all_gather(buf).cpu().reshape(world, max(counts), dim)
    rows = torch.cat([full[r, :c] for r, c in enumerate(counts)])
    return rows[:, :-1].numpy(), rows[:, -1].numpy() > 0


# ---------------------------------------------------------------------------------- evaluation

def task_rows(data: dict[str, RegionSet], kept: dict[str, np.ndarray], task: str) -> dict:
    """Rows and integer labels of one task: regions of its kind kept in the input; test rows
    whose class is absent from train are left out (no probe can predict them) and counted."""
    kind = TASKS[task]
    tr = np.flatnonzero((np.asarray(data["train"].kind) == kind) & kept["train"])
    te_all = np.flatnonzero((np.asarray(data["test"].kind) == kind) & kept["test"])
    classes = sorted({data["train"].label[i] for i in tr})
    cid = {c: j for j, c in enumerate(classes)}
    te = np.asarray([i for i in te_all if data["test"].label[i] in cid], np.int64)
    dropped = {s: int(((np.asarray(data[s].kind) == kind) & ~kept[s]).sum()) for s in ("train", "test")}
    return {"train": tr, "test": te, "classes": classes,
            "ytr": np.asarray([cid[data["train"].label[i]] for i in tr], np.int64),
            "yte": np.asarray([cid[data["test"].label[i]] for i in te], np.int64),
            "counts": {"classes": len(classes), "n_train": len(tr), "n_test": len(te),
                       "unseen_test": len(te_all) - len(te), "dropped_out_of_view": dropped}}


def probe_task(feats: dict[str, np.ndarray], rows: dict, cfg: RegionEvalConfig, seed: int) -> dict:
    """Linear probe + k-NN of one task (or the reason it cannot run), with chance/majority."""
    out = {"counts": rows["counts"]}
    if rows["counts"]["classes"] < 2 or len(rows["test"]) == 0:
        return {**out, "skipped": "needs >= 2 classes in train and >= 1 test region of a train class"}
    xtr, xte = feats["train"][rows["train"]], feats["test"][rows["test"]]
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise EvalInputError("non-finite region features")
    t0 = time.perf_counter()
    lin = probe.linear_probe(xtr, rows["ytr"], xte, rows["yte"], cfg.linear.c_grid, cfg.val_fraction,
                             cfg.linear.max_iter, cfg.linear.standardize, seed)
    knn = probe.knn_probe(xtr, rows["ytr"], xte, rows["yte"], cfg.knn.ks, cfg.knn.temperature,
                          cfg.val_fraction, seed)
    return {**out, "linear": lin, "knn": knn, **probe.baselines(rows["ytr"], rows["yte"]),
            "probe_s": round(time.perf_counter() - t0, 2)}


# feature -> (cache dataset name, fingerprint tag, extractor builder, per-batch function)
FEATURES = {
    "patch_mean": ("regions", "patch_mean_v1", lambda spec, device, ctx: build_extractor(spec, device, ctx),
                   patch_mean_fn),
    "region_head": ("region_head", "region_head_v1", None, region_head_fn),
}


def model_features(spec: ModelSpec) -> list[str]:
    """The features a model has: pooled patch tokens always; RICE's own region embeddings when the
    export holds its region head (training/evaluation/region_head.py)."""
    from training.evaluation.region_head import has_region_head
    return ["patch_mean"] + (["region_head"] if has_region_head(spec) else [])


def _build(feature: str, spec: ModelSpec, device, ctx: DistContext) -> Extractor:
    if feature == "region_head":
        from training.evaluation.region_head import build_region_head
        from training.safe_load import every_rank_reads
        return every_rank_reads(ctx, lambda: build_region_head(spec, device))
    return FEATURES[feature][2](spec, device, ctx)


def _features(spec: ModelSpec, feature: str, data: dict[str, RegionSet], cache: FeatureCache,
              cfg: RegionEvalConfig, ctx: DistContext, device, state: dict) -> tuple[dict, dict, dict]:
    """Per split: features and kept mask (from the cache when its fingerprint matches), timing."""
    feats, kept, timing = {}, {}, {}
    mkey = _model_key(spec)
    dataset, tag, _, fn = FEATURES[feature]
    for split, rs in data.items():
        fp = _hash({"model": mkey, "data": rs.fingerprint(), "feature": tag})
        x, meta = cache.get(spec.name, dataset, split, fp) if ctx.is_main else (None, {})
        hit = ctx.broadcast_object(x is not None)
        if hit:
            x, k = (x, np.asarray(meta["kept"], bool)) if ctx.is_main else (None, None)
            timing[split] = {k_: meta.get(k_) for k_ in ("seconds", "images_per_s")} if ctx.is_main else {}
        else:
            if "ex" not in state:
                t0 = time.perf_counter()
                state["ex"] = _build(feature, spec, device, ctx)
                state["info"] = to_jsonable(state["ex"].info)
                log.info("built %s (%s, %s) in %.1f s", spec.name, spec.kind, feature, time.perf_counter() - t0)
            t0 = time.perf_counter()
            x, k = extract_regions(state["ex"], rs, ctx, cfg.batch_size, cfg.workers, device,
                                   f"{spec.name}/{dataset}/{split}", fn(state["ex"]))
            dt = time.perf_counter() - t0
            timing[split] = {"seconds": round(dt, 2), "images_per_s": round(len(rs.images) / max(dt, 1e-9), 1)}
            if ctx.is_main:
                cache.put(spec.name, dataset, split, fp, x, {"model": spec.name, "split": split, "feature": feature,
                                                             "kept": k.tolist(), **timing[split]})
        feats[split], kept[split] = x, k
    return feats, kept, timing


def _open_data(cfg: RegionEvalConfig, ctx: DistContext) -> dict[str, RegionSet]:
    """Both splits, checked on rank 0 first (a bad file is one line, every rank stops), then read
    by the other ranks (nothing large is broadcast)."""
    sets: dict = {}

    def read():
        for split, spec in (("train", cfg.train), ("test", cfg.test)):
            sets[split] = open_regions(spec)
    ctx.agree(read)
    return sets if sets else {s: open_regions(p) for s, p in (("train", cfg.train), ("test", cfg.test))}


def _summary(data: dict[str, RegionSet]) -> dict:
    out = {}
    for split, rs in data.items():
        kinds = np.asarray(rs.kind)
        out[split] = {"images": len(rs.images), "regions": len(rs.kind),
                      **{t: {"regions": int((kinds == k).sum()),
                             "labels": len({lab for lab, kd in zip(rs.label, rs.kind) if kd == k})}
                         for t, k in TASKS.items()}}
    return out


def _probe_rows(spec: ModelSpec, feature: str, feats, kept, data, cache: FeatureCache, cfg: RegionEvalConfig,
                prev_rows: dict, probe_key: dict, seed: int) -> list[dict]:
    """Rank 0: one row per task (reused from results.json while features and probe settings match)."""
    dataset = FEATURES[feature][0]
    mt = [fs.mtime_ns(cache.paths(spec.name, dataset, s)[0]) for s in ("train", "test")]
    rows = []
    for task in cfg.tasks:
        rkey = _hash({"features": mt, "probe": probe_key, "task": task, "feature": feature})
        row = prev_rows.get((spec.name, feature, task))
        if row is None or row.get("key") != rkey:
            row = to_jsonable({"model": spec.name, "feature": feature, "task": task, "key": rkey,
                               "dim": int(feats["train"].shape[1]),
                               **probe_task(feats, task_rows(data, kept, task), cfg, seed)})
        rows.append(row)
    return rows


def _log_rows(rows: list[dict], tracker: Tracker | None) -> None:
    for r in rows:
        if "linear" in r:
            log.info("%s [%s] %s: linear %.1f%%, k-NN %.1f%% (%d train / %d test regions, %d classes)",
                     r["model"], r["feature"], r["task"], 100 * r["linear"]["top1"], 100 * r["knn"]["top1"],
                     r["counts"]["n_train"], r["counts"]["n_test"], r["counts"]["classes"])
            if tracker is not None:
                pre = f"eval_regions/{r['task']}/{r['model']}/{r['feature']}"
                tracker.log({f"{pre}/linear_top1": r["linear"]["top1"], f"{pre}/knn_top1": r["knn"]["top1"]})


def evaluate_regions(run: RunConfig, cfg: RegionEvalConfig, ctx: DistContext,
                     tracker: Tracker | None = None) -> dict:
    out = Path(cfg.out_dir)
    cache = FeatureCache(out / "features")
    device = _device(cfg, ctx)
    models = [m for m in cfg.models if m.enabled]
    if not models:
        raise ConfigError("eval_regions: no model enabled (eval_regions.models)")
    data = _open_data(cfg, ctx)
    res_path = out / "results.json"
    prev = read_json(res_path) if ctx.is_main and fs.isfile(res_path) else {}  # out_dir may be a URL
    prev_rows = {(r["model"], r.get("feature", "patch_mean"), r["task"]): r for r in prev.get("results", [])}
    report = {"train": cfg.train, "test": cfg.test, "data": _summary(data), "models": {}, "results": []}
    probe_key = {"val_fraction": cfg.val_fraction, "linear": asdict(cfg.linear), "knn": asdict(cfg.knn),
                 "seed": run.seed}
    for spec in models:
        features = ctx.agree(lambda: model_features(spec))
        report["models"][spec.name] = {"kind": spec.kind, "spec": to_jsonable(asdict(spec)), "features": features,
                                       "extract": {}}
        for feature in features:
            state: dict = {}
            feats, kept, timing = _features(spec, feature, data, cache, cfg, ctx, device, state)
            info = state.get("info") or prev.get("models", {}).get(spec.name, {}).get("info")
            if feature == "patch_mean":
                report["models"][spec.name]["info"] = info
            report["models"][spec.name]["extract"][feature] = timing
            rows = ctx.agree(lambda: _probe_rows(spec, feature, feats, kept, data, cache, cfg, prev_rows,
                                                 probe_key, run.seed))
            if ctx.is_main:
                _log_rows(rows, tracker)
                report["results"] += rows
                _write(out, report)
            ctx.barrier()
            state.clear()  # frees the model before the next one is built
    return report


FEATURE_NAMES = {"patch_mean": "patch mean", "region_head": "region head"}


def markdown_table(report: dict) -> str:
    """(model, feature) x {object linear, object k-NN, word linear, word k-NN} top-1 (%), then
    baselines and counts. A model without region layers gets a "region head" row saying so."""
    tasks = list(dict.fromkeys(r["task"] for r in report["results"]))
    cells = {(r["model"], r.get("feature", "patch_mean"), r["task"]): r for r in report["results"]}
    lines = ["| model | feature | " + " | ".join(f"{t} linear | {t} k-NN" for t in tasks) + " |",
             "|---|---|" + "---:|---:|" * len(tasks)]
    for m, minfo in report["models"].items():
        for f in FEATURE_NAMES:
            if f not in minfo.get("features", ["patch_mean"]):
                lines.append(f"| {m} | {FEATURE_NAMES[f]}: none (no region layers) | "
                             + " | ".join(["n/a"] * 2 * len(tasks)) + " |")
                continue
            row = [m, FEATURE_NAMES[f]]
            for t in tasks:
                r = cells.get((m, f, t), {})
                row += ([f"{100 * r['linear']['top1']:.1f}", f"{100 * r['knn']['top1']:.1f}"] if "linear" in r
                        else ["n/a", "n/a"])
            lines.append("| " + " | ".join(row) + " |")
    base, notes = ["chance / majority", ""], []
    for t in tasks:
        r = next((c for k, c in cells.items() if k[2] == t and "linear" in c), None)
        base += [f"{100 * r['chance']:.1f} / {100 * r['majority']:.1f}" if r else "", ""]
        c = next(c["counts"] for k, c in cells.items() if k[2] == t)
        notes.append(f"{t}: {c['n_train']} train / {c['n_test']} test regions, {c['classes']} classes"
                     + (f", {c['unseen_test']} test regions of classes unseen in train left out"
                        if c["unseen_test"] else ""))
    lines.append("| " + " | ".join(base) + " |")
    return ("Region recognition, top-1 accuracy (%) on probe/test. Features: patch mean = mean of the "
            "last_hidden_state patch tokens whose cell overlaps the box (every model); region head = "
            "the model's own Region Transformer output for the box (RICE only: plain MLCD and random "
            "init have no region layers); both L2-normalized. Linear: L-BFGS logistic regression, "
            "C chosen on a validation split of train; k-NN: cosine, T = 0.07, k chosen on the same split.\n"
            f"({'; '.join(notes)})\n\n" + "\n".join(lines) + "\n")


def _write(out: Path, report: dict) -> None:
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown_table(report))


def run_eval_regions(run: RunConfig, cfg: RegionEvalConfig, ctx: DistContext) -> dict:
    # models may change between reruns: the feature cache is checked by fingerprint
    ctx.agree(lambda: prepare_out_dir(cfg.out_dir, run, {"run": run, "eval_regions": cfg}, "eval_regions"))
    tracker = Tracker(run, ctx, cfg.out_dir, "eval_regions", {"run": asdict(run), "eval_regions": asdict(cfg)})
    try:
        report = evaluate_regions(run, cfg, ctx, tracker)
    finally:
        tracker.finish()
    if ctx.is_main:
        print(markdown_table(report))
    return report


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("eval-regions", run_eval_regions, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("eval-regions")
