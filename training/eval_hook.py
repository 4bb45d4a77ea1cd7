"""Evaluation during training (``train.eval_every``, ``train.eval_sets``): k-NN top-1 (and with
``train.eval_linear`` the linear probe) of the backbone being trained, on held-out labeled sets.

The trainer calls ``EvalDuringTraining.after_step`` once per step (training/trainer.py); every
``eval_every`` steps, and at the last step (also one cut short by the time budget), it extracts
pooled features of each set with the in-memory model (no export round trip; the export's image
processor, so the numbers match what `mlcd eval` reports for a checkpoint of that step) and
scores them with training/evaluation's probes. The results are returned as flat keys
``eval/<set>/knn_top1`` (+ ``linear_top1``, ``eval/seconds``), which the trainer's metrics
record of that step carries to metrics.jsonl and wandb.

Ranks: extraction is split over ranks as in `mlcd eval` (features.extract: row blocks,
all-gathered; under ZeRO-3 every rank runs every row instead, because its forward gathers
parameters collectively and the ranks must run the same batches); rank 0 probes inside
``ctx.agree`` (its error stops every rank, the result reaches every rank).

It leaves training as it was: model mode restored, no gradients, and the torch RNG (CPU and the
device's) forked, so the loss stream equals one with evaluation off (tests/test_eval_during.py).
Cost: 2 x ``eval_max_images`` forwards per set (split over ranks), plus the image decode and
resize on the CPU; the k-NN is a (rows x rows) matmul.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pipeline.core.dist import DistContext
from training.config import TrainConfig
from training.evaluation import probe
from training.evaluation.features import LabeledImages, extract, model_extractor, open_labeled
from training.model import ModelConfig

log = logging.getLogger("mlcd.train")


def subsample(ds: LabeledImages, n: int) -> LabeledImages:
    """At most n rows, evenly spaced over the set (deterministic, spans every shard)."""
    if len(ds) <= n:
        return ds
    idx = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))
    return LabeledImages(ds.source, [ds.items[i] for i in idx], ds.labels[idx], ds.classes)


def open_sets(cfg: TrainConfig) -> dict[str, tuple[LabeledImages, LabeledImages]]:
    sets = {}
    for d in cfg.eval_sets:
        if not d.enabled:
            continue
        tr, te = open_labeled(d.train), open_labeled(d.test)
        sets[d.name] = (subsample(tr, cfg.eval_max_images), subsample(te, cfg.eval_max_images))
    return sets


class EvalDuringTraining:
    """Built with the Trainer (the sets are opened then, before the engine: a bad path is one
    line, exit 2); a no-op when ``train.eval_every`` is 0."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, ctx: DistContext, seed: int):
        self.cfg, self.model_cfg, self.ctx, self.seed = cfg, model_cfg, ctx, seed
        self.sets = ctx.agree(lambda: open_sets(cfg)) if cfg.eval_every else {}

    def due(self, step: int, stopping: bool) -> bool:
        every = self.cfg.eval_every
        return bool(every and self.sets) and (step % every == 0 or step == self.cfg.steps or stopping)

    def after_step(self, model: torch.nn.Module, step: int, stopping: bool) -> dict[str, float]:
        """{} unless due; else the eval/ keys of this step. Collective when due (every rank calls)."""
        if not self.due(step, stopping):
            return {}
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        forked = [device.index or 0] if device.type == "cuda" else []
        was_training = model.training
        with torch.random.fork_rng(devices=forked), torch.no_grad():
            model.eval()
            try:
                out = self._evaluate(model, device)
            finally:
                model.train(was_training)
        out["eval/seconds"] = time.perf_counter() - t0
        if self.ctx.is_main:
            log.info("step %d eval: %s (%.1f s)", step, ", ".join(
                f"{k.removeprefix('eval/')} {100 * v:.1f}%" for k, v in out.items() if k != "eval/seconds"),
                out["eval/seconds"])
        return out

    def _evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        ex = model_extractor(model, self.model_cfg, "pooled", dtype=next(model.parameters()).dtype, module=False)
        # ZeRO-3: the forward gathers parameters collectively, so every rank runs every row
        ectx = DistContext(device=device) if self.cfg.deepspeed.zero_stage == 3 else self.ctx
        cfg, out = self.cfg, {}
        for name, (tr, te) in self.sets.items():
            xtr = extract(ex, tr, ectx, cfg.data.batch_size, 0, f"eval {name}/train", device)
            xte = extract(ex, te, ectx, cfg.data.batch_size, 0, f"eval {name}/test", device)

            def scores(xtr=xtr, xte=xte, tr=tr, te=te, name=name) -> dict[str, float]:
                if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
                    return {}  # diverging weights: the loss check stops the run, not the eval
                knn = probe.knn_probe(xtr, tr.labels, xte, te.labels, cfg.eval_knn.ks,
                                      cfg.eval_knn.temperature, seed=self.seed)
                res = {f"eval/{name}/knn_top1": knn["top1"]}
                if cfg.eval_linear:
                    res[f"eval/{name}/linear_top1"] = probe.linear_probe(
                        xtr, tr.labels, xte, te.labels, seed=self.seed)["top1"]
                return res
            out.update(self.ctx.agree(scores))
        return out
