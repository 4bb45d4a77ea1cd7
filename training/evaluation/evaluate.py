"""Linear probe + k-NN of frozen features, for several models on several labeled image sets.

    python -m training.evaluation.evaluate --config configs/demo.yaml [eval.key=value ...]
    torchrun --nproc_per_node 2 -m training.evaluation.evaluate --config ...   # extraction split over ranks

Models (``eval.models``) and datasets (``eval.datasets``) are lists of named entries: a layered run
file replaces a whole list, an override switches one entry off (``eval.models.2.enabled=false``)
or replaces the list (``'eval.models=[{name: clip, kind: open_clip, arch: ViT-B-32}]'``).
Features are extracted under torchrun (ranks take disjoint row blocks) and cached per (model,
dataset, split) as ``features/<model>/<dataset>_<split>.npy`` with a fingerprint of the weights,
the dataset rows and the spec: a rerun skips finished extraction, and probes whose result (same
features, same probe settings) is on disk.

Outputs in ``eval.out_dir``: ``results.json`` (every number, per-k k-NN, chosen C/k, baselines,
extraction throughput) and ``results.md`` (one row per model, linear / k-NN top-1 per dataset),
rewritten atomically after each (model, dataset) so a killed run leaves a valid partial table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import fs
from pipeline.core.config import RESUMABLE, ConfigError, RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.io import atomic_save_npy, atomic_write_json, atomic_write_text, load_npy, read_json
from pipeline.core.tracking import Tracker
from training.evaluation import probe
from training.evaluation.features import (
    KINDS,
    EvalInputError,
    build_extractor,
    extract,
    open_labeled,
    to_jsonable,
)

log = logging.getLogger("mlcd.eval")


@dataclass
class DatasetSpec:
    name: str = ""
    train: str = ""   # shard folder/spec with `cls` in each .json, an image folder per class, or a .csv/.parquet list with cls
    test: str = ""
    enabled: bool = True


@dataclass
class ModelSpec:
    name: str = ""
    kind: str = "hf"  # checkpoint | hf | open_clip | encoder | random
    # checkpoint: training out_dir / checkpoints dir / step folder, or a bare .safetensors state;
    # hf: exported folder; random: optional checkpoint/export folder whose architecture to copy
    path: str = ""
    arch: str = ""                  # open_clip model name (ViT-B-32, ...)
    pretrained: str | None = None   # open_clip tag or local weights file; null = random init
    # checkpoint (bare state) / random: ModelConfig fields; encoder: the stage-1 encoder config
    model: dict[str, Any] = field(default_factory=dict)
    seed: int = 0                   # init seed for random weights
    feature: str = "pooled"         # our models: pooled (= HF pooler_output) | head (training head)
    enabled: bool = True


@dataclass
class LinearConfig:
    # CLIP sweeps C over 1e-6..1e6 (96 steps); on standardized features this short grid spans
    # what the demo's models pick (0.01 .. 10) and costs 7 warm-started fits. 0.601 is DeepGlint's.
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 0.601, 3.0, 10.0, 100.0])
    max_iter: int = 1000
    standardize: bool = True


@dataclass
class KnnConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07


@dataclass
class EvalConfig:
    out_dir: str = "${run.out_dir}/eval"
    # lists, not name-keyed dicts: a layered run file can replace a list but (with struct configs)
    # cannot add keys to a dict
    datasets: list[DatasetSpec] = field(default_factory=list, metadata=RESUMABLE)
    models: list[ModelSpec] = field(default_factory=list, metadata=RESUMABLE)
    val_fraction: float = 0.2       # of train, held out to choose C and k
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    batch_size: int = field(default=64, metadata=RESUMABLE)
    workers: int = field(default=2, metadata=RESUMABLE)  # DataLoader workers per rank (decode + preprocess)
    device: str = field(default="auto", metadata=RESUMABLE)  # auto (cuda if present) | cpu | cuda

    def __post_init__(self):
        self.datasets = [_spec(DatasetSpec, v, f"datasets.{i}") for i, v in enumerate(self.datasets)]
        self.models = [_spec(ModelSpec, v, f"models.{i}") for i, v in enumerate(self.models)]
        for what, specs in (("datasets", self.datasets), ("models", self.models)):
            names = [s.name for s in specs]
            for i, n in enumerate(names):
                check(bool(n) and "/" not in n and n not in (".", ".."), f"{what}.{i}.name", n,
                      "must be a non-empty plain name (it names cache folders)")
            check(len(set(names)) == len(names), what, names, "names must be unique")
        for i, d in enumerate(self.datasets):
            check(bool(d.train and d.test), f"datasets.{i}", asdict(d), "needs train and test paths")
        for i, m in enumerate(self.models):
            k = i
            check(m.kind in KINDS, f"models.{k}.kind", m.kind, f"must be one of {KINDS}")
            check(m.feature in ("pooled", "head"), f"models.{k}.feature", m.feature, "must be pooled or head")
            check(m.kind not in ("checkpoint", "hf") or bool(m.path), f"models.{k}.path", m.path,
                  f"required for kind={m.kind}")
            check(m.kind != "open_clip" or bool(m.arch), f"models.{k}.arch", m.arch, "required for open_clip")
            check(m.kind != "random" or bool(m.path or m.model), f"models.{k}", "random",
                  "needs `model` (ModelConfig fields) or `path` (architecture to copy)")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "must be in (0, 1)")
        check(len(self.linear.c_grid) > 0 and all(c > 0 for c in self.linear.c_grid),
              "linear.c_grid", self.linear.c_grid, "must be a non-empty list of C > 0")
        check(len(self.knn.ks) > 0 and all(k > 0 for k in self.knn.ks), "knn.ks", self.knn.ks,
              "must be a non-empty list of k > 0")
        check(self.knn.temperature > 0, "knn.temperature", self.knn.temperature, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "must be auto, cpu or cuda")


def _spec(cls, v, key):
    if isinstance(v, cls):
        return v
    if not isinstance(v, dict):
        raise ConfigError(f"{key}={v!r}: must be a mapping")
    unknown = set(v) - {f for f in cls.__dataclass_fields__}
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)}")
    return cls(**v)


# --------------------------------------------------------------------------------- evaluation

def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_key(spec: ModelSpec) -> dict:
    """What the features depend on, known before loading the model (weights identity added)."""
    from training.evaluation.features import _weights_id, resolve_checkpoint
    key = asdict(spec)
    key.pop("enabled")
    key.pop("name")
    p = Path(spec.path) if spec.path else None
    try:
        if spec.kind == "checkpoint" and p is not None and p.suffix != ".safetensors":
            key["weights"] = _weights_id(resolve_checkpoint(spec.path) / "trainer_state.json")
        elif p is not None and p.exists():
            key["weights"] = _weights_id(p)
        if spec.pretrained and Path(spec.pretrained).is_file():
            key["weights_pretrained"] = _weights_id(Path(spec.pretrained))
    except EvalInputError:
        pass  # reported when the model is built
    return key


class FeatureCache:
    """features/<model>/<dataset>_<split>.npy + .json (fingerprint); labels ride in the .json's
    sibling ``_labels.npy``. A file is valid only if its fingerprint matches."""

    def __init__(self, root: Path):
        self.root = root

    def paths(self, model: str, dataset: str, split: str) -> tuple[Path, Path]:
        base = self.root / model / f"{dataset}_{split}"
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def get(self, model: str, dataset: str, split: str, fp: str) -> tuple[np.ndarray | None, dict]:
        npy, meta = self.paths(model, dataset, split)
        if not (fs.isfile(npy) and fs.isfile(meta)):
            return None, {}
        try:
            info = read_json(meta)
            if info.get("fingerprint") != fp:
                return None, {}
            return load_npy(npy), info
        except (ValueError, OSError):
            return None, {}  # a damaged cache entry is recomputed

    def put(self, model: str, dataset: str, split: str, fp: str, x: np.ndarray, info: dict) -> None:
        npy, meta = self.paths(model, dataset, split)
        atomic_save_npy(npy, x.astype(np.float32))
        atomic_write_json(meta, {"fingerprint": fp, "shape": list(x.shape), **info})


def _device(cfg: EvalConfig, ctx: DistContext) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("eval.device='cuda' but no CUDA device is available")
    return ctx.device if ctx.device.type == "cuda" else torch.device("cuda", 0)


def evaluate(run: RunConfig, cfg: EvalConfig, ctx: DistContext, tracker: Tracker | None = None) -> dict:
    out = Path(cfg.out_dir)
    cache = FeatureCache(out / "features")
    device = _device(cfg, ctx)
    datasets = {d.name: d for d in cfg.datasets if d.enabled}
    models = {m.name: m for m in cfg.models if m.enabled}
    if not datasets or not models:
        raise ConfigError(f"eval: nothing to do ({len(datasets)} datasets, {len(models)} models enabled)")
    data = {}
    for name, d in datasets.items():
        tr, te = open_labeled(d.train), open_labeled(d.test)
        if tr.classes != te.classes:
            raise EvalInputError(f"dataset {name}: train ({d.train}) and test ({d.test}) class lists differ")
        data[name] = (tr, te)
    results_path = out / "results.json"
    prev = read_json(results_path) if ctx.is_main and fs.isfile(results_path) else {}
    prev_rows = {(r["model"], r["dataset"]): r for r in prev.get("results", [])}
    report = {"datasets": {}, "models": {}, "results": []}
    for name, (tr, te) in data.items():
        report["datasets"][name] = {"train": datasets[name].train, "test": datasets[name].test,
                                    "classes": tr.classes, "n_train": len(tr), "n_test": len(te),
                                    **probe.baselines(tr.labels, te.labels)}
    probe_key = {"val_fraction": cfg.val_fraction, "linear": asdict(cfg.linear),
                 "knn": asdict(cfg.knn), "seed": run.seed}
    for mname, spec in models.items():
        mkey = _model_key(spec)
        ex = None
        report["models"][mname] = {"kind": spec.kind, "spec": to_jsonable(asdict(spec))}
        if "info" in prev.get("models", {}).get(mname, {}):  # from the run that extracted
            report["models"][mname]["info"] = prev["models"][mname]["info"]
        for dname, (tr, te) in data.items():
            feats, timing = {}, {}
            for split, ds in (("train", tr), ("test", te)):
                fp = _hash({"model": mkey, "data": ds.fingerprint()})
                x, meta = cache.get(mname, dname, split, fp) if ctx.is_main else (None, {})
                hit = ctx.broadcast_object(x is not None)
                if hit and "seconds" in meta:  # the timing of the run that extracted them
                    timing[split] = {k: meta[k] for k in ("seconds", "images_per_s")}
                if not hit:
                    if ex is None:
                        t0 = time.perf_counter()
                        ex = build_extractor(spec, device, ctx)
                        log.info("built %s (%s, %.1fM params) in %.1f s", mname, spec.kind,
                                 ex.info.get("params", 0) / 1e6, time.perf_counter() - t0)
                        report["models"][mname]["info"] = to_jsonable(ex.info)
                    t0 = time.perf_counter()
                    x = extract(ex, ds, ctx, cfg.batch_size, cfg.workers, f"{mname}/{dname}/{split}", device)
                    dt = time.perf_counter() - t0
                    timing[split] = {"seconds": round(dt, 2),
                                     "images_per_s": round(len(ds) / max(dt, 1e-9), 1)}
                    if ctx.is_main:
                        cache.put(mname, dname, split, fp, x, {"model": mname, "dataset": dname,
                                                               "split": split, **timing[split]})
                feats[split] = x

            def probe_row():  # rank 0 probes; an error there stops every rank (no one waits)
                rkey = _hash({"features": [fs.mtime_ns(cache.paths(mname, dname, s)[0])
                                           for s in ("train", "test")], "probe": probe_key})
                row = prev_rows.get((mname, dname))
                if row is None or row.get("key") != rkey:
                    # JSON round trip: int/float dict keys become strings, as in a reused row
                    row = to_jsonable(_probe_row(mname, dname, feats, tr, te, cfg, run.seed, rkey, timing))
                return row
            row = ctx.agree(probe_row)
            if not ctx.is_main:
                continue
            report["results"].append(row)
            if tracker is not None:
                tracker.log({f"eval/{dname}/{mname}/linear_top1": row["linear"]["top1"],
                             f"eval/{dname}/{mname}/knn_top1": row["knn"]["top1"]})
            _write(out, report)
        ctx.barrier()
        del ex
    return report


def _probe_row(mname, dname, feats, tr, te, cfg: EvalConfig, seed: int, rkey: str, timing: dict) -> dict:
    xtr, xte = feats["train"], feats["test"]
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise EvalInputError(f"model {mname}: non-finite features on {dname}")
    t0 = time.perf_counter()
    lin = probe.linear_probe(xtr, tr.labels, xte, te.labels, cfg.linear.c_grid, cfg.val_fraction,
                             cfg.linear.max_iter, cfg.linear.standardize, seed)
    knn = probe.knn_probe(xtr, tr.labels, xte, te.labels, cfg.knn.ks, cfg.knn.temperature,
                          cfg.val_fraction, seed)
    log.info("%s on %s: linear %.1f%% (C=%g), k-NN %.1f%% (k=%d) [%.1f s]", mname, dname,
             100 * lin["top1"], lin["C"], 100 * knn["top1"], knn["k"], time.perf_counter() - t0)
    return {"model": mname, "dataset": dname, "key": rkey, "dim": int(xtr.shape[1]),
            "linear": lin, "knn": knn, "extract": timing}


def markdown_table(report: dict) -> str:
    """One row per model; per dataset: linear top-1 and k-NN top-1 (%), plus chance/majority."""
    dnames = list(report["datasets"])
    cells = {(r["model"], r["dataset"]): r for r in report["results"]}
    head = "| model | " + " | ".join(f"{d} linear | {d} k-NN" for d in dnames) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(dnames)]
    for m in report["models"]:
        row = [m]
        for d in dnames:
            r = cells.get((m, d))
            row += [f"{100 * r['linear']['top1']:.1f}", f"{100 * r['knn']['top1']:.1f}"] if r else ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    base = ["chance / majority"]
    for d in dnames:
        ds = report["datasets"][d]
        base += [f"{100 * ds['chance']:.1f} / {100 * ds['majority']:.1f}", ""]
    lines.append("| " + " | ".join(base) + " |")
    notes = ", ".join(f"{d}: {report['datasets'][d]['n_train']} train / {report['datasets'][d]['n_test']} "
                      f"test, {len(report['datasets'][d]['classes'])} classes" for d in dnames)
    return ("Top-1 accuracy (%) on test. Linear: L-BFGS logistic regression, C chosen on a "
            "validation split of train. k-NN: cosine, T = 0.07, k chosen on the same split.\n"
            f"({notes})\n\n" + "\n".join(lines) + "\n")


def _write(out: Path, report: dict) -> None:
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown_table(report))


def run_eval(run: RunConfig, cfg: EvalConfig, ctx: DistContext) -> dict:
    # models/datasets may change between reruns: the caches are checked by fingerprint
    ctx.agree(lambda: prepare_out_dir(cfg.out_dir, run, {"run": run, "eval": cfg}, "eval"))
    tracker = Tracker(run, ctx, cfg.out_dir, "eval", {"run": asdict(run), "eval": asdict(cfg)})
    try:
        report = evaluate(run, cfg, ctx, tracker)
        tracker.log_table("eval/results", ["model", "dataset", "linear_top1", "knn_top1", "dim"],
                          [[r["model"], r["dataset"], r["linear"]["top1"], r["knn"]["top1"], r["dim"]]
                           for r in report["results"]])
    finally:
        tracker.finish()
    if ctx.is_main:
        print(markdown_table(report))
    return report


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("eval", run_eval, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("eval")
