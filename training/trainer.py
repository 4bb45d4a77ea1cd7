"""The Trainer: builds the DeepSpeed engine (backbone), the PartialFC class centers (outside
DeepSpeed), their optimizer and the run state once; ``fit()`` runs the loop
(``train_step`` -> ``forward_backward``); a ``CheckpointManager`` decides when to save, what to
keep and how to resume.

Per step: for each micro-batch, embeddings -> PartialFC loss over the global batch -> backward
(DeepSpeed averages backbone grads over ranks; the all-gather's backward multiplies by W to undo
that, since the loss is already a global mean) -> engine.step(); at the accumulation boundary the
centers' optimizer steps too.

With `train.regions.enabled` (RICE) the model is training/regions.py's MLCDRegionEncoder (the
same backbone + a Region Transformer head: one embedding per box), the region classes (clusters
K + OCR tokens V) get their own PartialFC (own seed stream, own optimizer on the same LR
schedule x its lr_mult), and each micro-batch's loss is image loss + weight x region loss (one
backward; padding regions masked out of the region loss). Checkpoints keep both center sets.

Used by the stage (training/train.py), the throughput bench (training/bench_train.py) and the
exactness test (tests/test_partial_fc.py): the same build, the same step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, RunConfig, to_dict
from pipeline.dist import DistContext
from pipeline.entry import StageError
from pipeline.io import atomic_write_text
from pipeline.tracking import Tracker, progress
from training import checkpoint as ckpt
from training.config import CheckpointConfig, OptimConfig, TrainConfig, schedule_phase
from training.data import epoch_length, find_parts, make_loader
from training.init_weights import FinetuneConfig, load_initial_centers, load_initial_weights, param_groups
from training.model import build_model
from training.partial_fc import PartialFC, make_optimizer
from training.validate import TrainInputError, region_spec

log = logging.getLogger("mlcd.train")
REGION_SEED = 1 << 20  # the region centers' init and sampling: seed + REGION_SEED (another stream)


class TrainingDiverged(StageError, FloatingPointError):
    """A non-finite loss: stopped before any optimizer step used it (exit 1, one line)."""
    label = "training diverged"


def checked_input(fn):
    """``fn()``, with a missing/unfit input file turned into one line for the user."""
    try:
        return fn()
    except (ConfigError, StageError):
        raise
    except (OSError, ValueError) as e:
        raise TrainInputError(str(e)) from None


# ---------------------------------------------------------------- optimizers and engine config

def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = schedule_phase(step, cfg, total)  # training/config.py: train.extend_schedule's stretch
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_backbone_optimizer(model: torch.nn.Module, cfg: OptimConfig, ft: FinetuneConfig | None = None
                            ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, ft)  # decay groups + fine-tune knobs (init_weights.py)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in ds.extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero3_register_direct_params(model: torch.nn.Module) -> None:
    """ZeRO-3 re-gathers a module's own parameters for backward through hooks on its outputs, and
    only sees tensors inside tuples/lists/dicts: parameters a module holds directly (here
    vision_model.class_pos_emb) and uses in a forward returning a dataclass would be released
    before backward needs them. Hand them to the root module, whose output is a tensor."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    for mod in model.modules():
        if mod is model:
            continue
        for p in mod.parameters(recurse=False):
            if not isinstance(mod, (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding)):
                register_external_parameter(model, p)


# ---------------------------------------------------------------- the step

class RegionStep:
    """What the step needs for the region loss (train.regions): the region PartialFC, its
    optimizer and config. Micro-batches are then (images, labels, skipped, boxes (B, R, 4),
    region_labels (B, R, L), region_valid (B, R)) (training/region_data.py)."""

    def __init__(self, pfc: PartialFC, opt: torch.optim.Optimizer, cfg):
        self.pfc, self.opt, self.cfg = pfc, opt, cfg


def forward_backward(engine, pfc: PartialFC, images: torch.Tensor, labels: torch.Tensor, micro: int,
                     step: int, region: RegionStep | None = None, boxes: torch.Tensor | None = None,
                     region_labels: torch.Tensor | None = None, region_valid: torch.Tensor | None = None
                     ) -> tuple[float, dict[str, float]]:
    dtype = next(engine.module.parameters()).dtype
    x = images.to(engine.device, dtype, non_blocking=True)
    if region is None:
        emb = engine(x)
        loss, terms = pfc(emb, labels.to(engine.device), micro)
    else:
        loss, terms = _region_loss(engine, pfc, x, labels, micro, region, boxes, region_labels, region_valid)
    value = loss.item()  # identical on every rank (a global-batch loss): all stop together
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {step + 1} (micro-batch {micro}); stopped before "
                               f"any optimizer step used it. Lower optim.lr or check the data")
    engine.backward(loss)
    engine.step()  # an optimizer step only at the accumulation boundary
    return value, {k: float(v) for k, v in terms.items()}


def _region_loss(engine, pfc: PartialFC, x: torch.Tensor, labels: torch.Tensor, micro: int, region: RegionStep,
                 boxes: torch.Tensor, region_labels: torch.Tensor, region_valid: torch.Tensor):
    """image loss + weight x region loss over the B x R region rows (padding rows masked)."""
    dev, rcfg = engine.device, region.cfg
    valid = region_valid.to(dev, torch.bool)
    emb, remb = engine(x, boxes.to(dev, x.dtype), valid)
    rlab = region_labels.reshape(-1, region_labels.shape[-1]).to(dev)
    rloss, rterms = region.pfc(remb, rlab, micro, valid=valid.reshape(-1))
    if rcfg.image_loss:
        iloss, terms = pfc(emb, labels.to(dev), micro)
        loss = iloss + rcfg.weight * rloss
        terms["image_loss"] = iloss.detach()
    else:  # the image head still gets a (zero) gradient: DeepSpeed expects one for every parameter
        loss, terms = rcfg.weight * rloss + 0.0 * emb.sum(), {}
    terms["region_loss"] = rloss.detach()
    terms.update({f"region_{k}": v for k, v in rterms.items() if k != "valid_rows"})
    terms["regions_valid"] = rterms["valid_rows"]  # of the global micro-batch
    return loss, terms


def train_step(engine, pfc: PartialFC, pfc_opt, micro_batches: list, step: int, cfg: TrainConfig,
               region: RegionStep | None = None) -> dict[str, float]:
    lr = lr_at(step, cfg.optim, cfg.steps)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay (train.finetune)
    for g in pfc_opt.param_groups:
        g["lr"] = 0.0 if cfg.finetune.freeze_centers else lr * cfg.partial_fc.lr_mult
    centers = [(pfc, pfc_opt)]
    if region is not None:
        centers.append((region.pfc, region.opt))
        for g in region.opt.param_groups:
            g["lr"] = lr * region.cfg.partial_fc.lr_mult
    gas = len(micro_batches)
    sums: dict[str, float] = {}
    skipped_before = engine.skipped_steps
    for i, batch in enumerate(micro_batches):
        images, labels = batch[0], batch[1]
        loss, terms = forward_backward(engine, pfc, images, labels, step * gas + i, step, region,
                                       *(batch[3:6] if region is not None else ()))
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + (v if k == "regions_valid" else v / gas)  # regions per step
    for p, opt in centers:
        if cfg.deepspeed.precision == "fp16" and p.weight.grad is not None:  # engine.backward scaled them
            p.weight.grad.div_(float(getattr(engine.optimizer, "loss_scale", 1.0)))
        if engine.skipped_steps == skipped_before:  # fp16 overflow: DeepSpeed skipped; so do we
            opt.step()
        opt.zero_grad(set_to_none=True)
    gn = engine.get_global_grad_norm()
    sums.update(lr=lr, grad_norm=float(gn) if gn is not None else float("nan"))
    return sums


def micro_batches(cfg: TrainConfig, parts, image_size: int, num_classes: int, seed: int, rank: int,
                  start_step: int, loader=None) -> Iterator[list]:
    """Lists of grad_accum micro-batches from `start_step` on, epoch by epoch (training/data.py).
    loader(epoch, epoch_len, start): an epoch's batches from batch `start` on (None: data.py's
    make_loader; train.regions passes the region loader's)."""
    gas = cfg.deepspeed.grad_accum
    epoch_len = epoch_length(cfg.data, parts)  # from the data, never from checkpointing
    micro = start_step * gas
    group: list = []
    if loader is None:
        def loader(epoch: int, n: int, start: int):
            return make_loader(parts, cfg.data, image_size, cfg.loss.labels_used, num_classes, seed,
                               rank, epoch, n, start=start)
    while True:
        epoch, j = divmod(micro, epoch_len)
        for batch in loader(epoch, epoch_len, j):
            group.append(batch)
            micro += 1
            if len(group) == gas:
                yield group
                group = []


def find_train_parts(cfg: TrainConfig, region_classes: int = 0) -> list:
    """The shards to train on: images with labels (training/data.py), plus, with train.regions,
    each one's region part (training/region_data.py)."""
    if not cfg.regions.enabled:
        return find_parts(cfg.data, cfg.loss.labels_used)
    from training.region_data import find_region_parts
    return find_region_parts(cfg.data, region_spec(cfg, region_classes), cfg.loss.labels_used)


# ---------------------------------------------------------------- checkpoints

class CheckpointManager:
    """When to save (every ``checkpoint.every`` steps, at the last step, when the time budget
    runs out), what to keep (the newest ``checkpoint.keep`` complete ones) and how to resume:
    exactly (same world size and ZeRO stage: DeepSpeed reloads weights and moments) or re-sharded
    (another world size or stage: backbone weights from the fp32 consolidation, centers re-split
    over the new ranks, backbone moments restart). Layout and save order: training/checkpoint.py."""

    def __init__(self, root: Path, cfg: CheckpointConfig, ctx: DistContext, zero_stage: int):
        self.root, self.cfg, self.ctx = Path(root), cfg, ctx
        self.resume: Path | None = ctx.agree(lambda: ckpt.find_latest(self.root))
        self.state = ckpt.read_state(self.resume) if self.resume else {}
        self.exact = bool(self.resume) and (self.state.get("world_size"), self.state.get("zero_stage")) == (
            ctx.world_size, zero_stage)
        self.saved_at: int | None = None

    @staticmethod
    def clear(root: Path) -> None:
        """run.overwrite: a fresh start must not auto-resume (rank 0, before any manager exists)."""
        if root.exists():
            log.warning("run.overwrite: deleting %s", root)
            shutil.rmtree(root)

    def backbone_weights(self) -> dict[str, torch.Tensor] | None:
        """Initial backbone weights when resuming onto another layout (None otherwise)."""
        if not self.resume or self.exact:
            return None
        log.warning("resuming a %s-rank ZeRO-%s checkpoint on %d ranks: centers re-sharded, backbone "
                    "weights from the fp32 consolidation, backbone optimizer moments restart",
                    self.state.get("world_size"), self.state.get("zero_stage"), self.ctx.world_size)
        return ckpt.load_backbone_state_dict(self.resume)

    def load(self, engine, pfc: PartialFC, pfc_opt, region: RegionStep | None = None) -> tuple[int, int]:
        """(step, samples_seen) after restoring the engine (exact resumes) and the centers."""
        if not self.resume:
            return 0, 0
        if self.exact:
            ckpt.load_engine(engine, self.resume)  # weights-only, DeepSpeed's own files included
        ckpt.load_centers(self.resume, pfc, pfc_opt, int(self.state["world_size"]))
        if region is not None:
            ckpt.load_centers(self.resume, region.pfc, region.opt, int(self.state["world_size"]), ckpt.REGION_FC)
        step, seen = int(self.state["step"]), int(self.state["samples_seen"])
        log.info("resumed from %s (step %d, %d samples seen)", self.resume, step, seen)
        self.saved_at = step
        return step, seen

    def due(self, step: int, total: int, stopping: bool) -> bool:
        return step % self.cfg.every == 0 or step == total or stopping

    def save(self, step: int, engine, pfc: PartialFC, pfc_opt, state: dict, region: RegionStep | None = None
             ) -> Path:
        """Collective: every rank calls it."""
        out = ckpt.save(self.root, step, engine, pfc, pfc_opt, state, self.ctx, self.cfg.keep,
                        None if region is None else (region.pfc, region.opt))
        self.saved_at = step
        return out

    def latest(self) -> Path | None:
        return ckpt.find_latest(self.root)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Built once: backbone engine, PartialFC, its optimizer, the resume state. ``fit(stream)``
    trains from ``self.step`` to ``cfg.steps``; ``train_step(batches)`` is one optimizer step."""

    def __init__(self, run: RunConfig, cfg: TrainConfig, ctx: DistContext, num_classes: int,
                 checkpoints: CheckpointManager | None = None, out_dir: str | Path | None = None,
                 region_classes: int = 0):
        """region_classes: K + V of the region label space (train.regions.enabled only)."""
        self.run, self.cfg, self.ctx, self.num_classes = run, cfg, ctx, num_classes
        self.region_classes = region_classes
        self.checkpoints = checkpoints
        self.out = Path(out_dir) if out_dir is not None else None
        self.model_cfg = dataclasses.replace(
            cfg.model, grad_checkpointing=cfg.model.grad_checkpointing or cfg.deepspeed.activation_checkpointing)
        self.global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * ctx.world_size
        self.step, self.samples_seen = 0, 0
        self.build()

    def build(self) -> None:
        import deepspeed
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(self.run.seed)  # identical backbone init on every rank
        model = self._build_model()
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self._init_weights(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=make_backbone_optimizer(model, cfg.optim, cfg.finetune),
            config=deepspeed_config(cfg),
            dist_init_required=False)
        if cfg.deepspeed.zero_stage == 3:
            zero3_register_direct_params(self.engine.module)
        self.pfc = PartialFC(self.num_classes, model.out_dim, cfg.partial_fc, cfg.loss, ctx.rank, ctx.world_size,
                             ctx, seed=self.run.seed, grad_scale=float(ctx.world_size)).to(self.engine.device)
        self.pfc_opt = make_optimizer(self.pfc, cfg.partial_fc, cfg.optim.lr, cfg.optim.weight_decay,
                                      (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
        self.region: RegionStep | None = None
        if cfg.regions.enabled:
            r = cfg.regions
            loss_cfg = dataclasses.replace(cfg.loss, num_labels=r.num_labels)
            rpfc = PartialFC(self.region_classes, model.out_dim, r.partial_fc, loss_cfg, ctx.rank, ctx.world_size,
                             ctx, seed=self.run.seed + REGION_SEED, grad_scale=float(ctx.world_size)
                             ).to(self.engine.device)
            ropt = make_optimizer(rpfc, r.partial_fc, cfg.optim.lr, cfg.optim.weight_decay,
                                  (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
            self.region = RegionStep(rpfc, ropt, r)
        if self.checkpoints is not None:
            self.step, self.samples_seen = self.checkpoints.load(self.engine, self.pfc, self.pfc_opt, self.region)
        if not self._resuming:
            load_initial_centers(self.pfc, cfg)  # train.init_centers_from (a new run only)

    def _build_model(self) -> nn.Module:
        """The plain MLCDEncoder, or with train.regions the same backbone (same seeded init) plus
        the Region Transformer head (training/regions.py)."""
        if not self.cfg.regions.enabled:
            return build_model(self.model_cfg)
        from training.regions import MLCDRegionEncoder, RegionHeadConfig
        if self.region_classes < 1:
            raise ConfigError(f"train.regions: region_classes={self.region_classes}, must be >= 1 "
                              f"(label_space.json's num_classes)")
        return MLCDRegionEncoder(self.model_cfg, RegionHeadConfig(layers=self.cfg.regions.layers))

    @property
    def _resuming(self) -> bool:
        return self.checkpoints is not None and self.checkpoints.resume is not None

    def _init_weights(self, model: nn.Module) -> None:
        """The one place initial backbone weights are set (after the seeded init, before the
        engine exists): a checkpoint resumed onto another layout, or, for a new run,
        `train.init_from` (training/init_weights.py; a checkpoint in the run folder wins)."""
        if self._resuming:
            self.init_from = self.checkpoints.state.get("init_from")
            sd = self.checkpoints.backbone_weights()
            if sd is not None:
                model.load_state_dict(sd)
            return
        self.init_from = load_initial_weights(model, self.cfg, self.num_classes, self.ctx,
                                              self.out if self.out is not None else self.cfg.out_dir)

    def train_step(self, batches: list) -> dict[str, float]:
        try:
            return train_step(self.engine, self.pfc, self.pfc_opt, batches, self.step, self.cfg, self.region)
        except TrainingDiverged as e:
            kept = self.checkpoints.latest() if self.checkpoints is not None else None
            raise TrainingDiverged(f"{e}. Last good checkpoint kept: {kept or 'none yet'}") from None

    def state(self, last: dict) -> dict:
        """trainer_state.json of a checkpoint (what export and a resume read)."""
        run, cfg = self.run, self.cfg
        return {"step": self.step, "samples_seen": self.samples_seen, "seed": run.seed, "data_seed": run.seed,
                "rng": "sampling and data are seeded by (seed, rank, step); torch RNG per rank in "
                       "partial_fc/*.safetensors", "world_size": self.ctx.world_size,
                "zero_stage": cfg.deepspeed.zero_stage, "num_classes": self.num_classes,
                "global_batch": self.global_batch, "model_config": dataclasses.asdict(self.model_cfg.resolved()),
                "config": {"run": to_dict(run), "train": to_dict(cfg)}, "init_from": self.init_from,
                "last_metrics": last,
                **({"region_classes": self.region_classes, "region_head": {"layers": cfg.regions.layers}}
                   if self.region is not None else {})}

    def stream(self, parts) -> Iterator[list]:
        """parts: training/data.py's find_parts, or with train.regions region_data's find_region_parts."""
        size = self.model_cfg.resolved().image_size
        loader = None
        if self.region is not None:
            from training.region_data import make_region_loader
            cfg, spec = self.cfg, region_spec(self.cfg, self.region_classes)

            def loader(epoch: int, n: int, start: int):
                return make_region_loader(parts, cfg.data, size, cfg.loss.labels_used, self.num_classes, spec,
                                          self.run.seed, self.ctx.rank, epoch, n, start=start)
        return micro_batches(self.cfg, parts, size, self.num_classes, self.run.seed, self.ctx.rank, self.step,
                             loader)

    def fit(self, stream: Iterator[list]) -> dict:
        cfg, ctx = self.cfg, self.ctx
        metrics = _Metrics(self, self.out / "metrics.jsonl" if self.out else None)
        bar = progress(cfg.steps, "train", ctx, unit="step", initial=self.step)
        t_start, last = time.perf_counter(), {}
        while self.step < cfg.steps:
            batches = next(stream)
            last = self.train_step(batches)
            self.step += 1
            self.samples_seen += self.global_batch
            bar.update(1)
            metrics.add(last, batches)
            stopping = self._over_budget(t_start)
            if self.checkpoints is not None and self.checkpoints.due(self.step, cfg.steps, stopping):
                self.checkpoints.save(self.step, self.engine, self.pfc, self.pfc_opt, self.state(last), self.region)
            if stopping:
                log.warning("time budget %.0f s reached at step %d of %d; checkpoint saved (rerun to continue)",
                            cfg.time_budget_s, self.step, cfg.steps)
                break
        bar.close()
        metrics.finish()
        saved = self.checkpoints.saved_at if self.checkpoints is not None else None
        summary = {"step": self.step, "samples_seen": self.samples_seen,
                   "checkpoint": str(self.checkpoints.root / ckpt.tag_for(saved)) if saved is not None else None,
                   "last": last}
        if ctx.is_main:
            log.info("done: %s", json.dumps(summary))
        return summary

    def _over_budget(self, t_start: float) -> bool:
        """Every rank stops at the same step (the max over ranks of "my clock ran out")."""
        b = self.cfg.time_budget_s
        # on the device: nccl has no CPU backend (.item() syncs; the step's loss.item() already did)
        over = torch.tensor(float(b > 0 and time.perf_counter() - t_start > b), device=self.ctx.device)
        self.ctx.all_reduce_(over, "max")
        return bool(over.item())


class _Metrics:
    """Every `run.log_every` steps: throughput and the step's numbers to wandb and (rank 0)
    metrics.jsonl, which first drops lines a killed run logged after its last checkpoint."""

    def __init__(self, trainer: Trainer, path: Path | None):
        self.t, self.path = trainer, path
        ctx = trainer.ctx
        if ctx.is_main and path is not None:
            old = path.read_text().splitlines() if path.exists() else []
            atomic_write_text(path, "".join(ln + "\n" for ln in old if json.loads(ln)["step"] <= trainer.step))
        self.tracker = Tracker(trainer.run.wandb, ctx, str(path.parent if path else "."), "train",
                               {"train": to_dict(trainer.cfg)})
        self.t_start = self.t_log = time.perf_counter()
        self.n, self.skipped = 0, 0

    def add(self, last: dict, batches: list) -> None:
        t = self.t
        self.n += t.global_batch
        self.skipped += sum(int(b[2]) for b in batches)
        if t.step % t.run.log_every and t.step != t.cfg.steps:
            return
        now = time.perf_counter()
        last.update(samples_per_s=self.n / (now - self.t_log), skipped_unlabeled=self.skipped,
                    samples_seen=t.samples_seen, elapsed_s=now - self.t_start)
        if torch.cuda.is_available():
            last["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.n, self.t_log = 0, now
        self.tracker.log(last, t.step)
        if t.ctx.is_main:
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": t.step, **last}) + "\n")
            log.info("step %d/%d loss %.4f (pos %.4f neg %.4f) lr %.2e gnorm %.3g %.1f samples/s "
                     "sampled %d pos %d neg/image %.0f", t.step, t.cfg.steps, last["loss"], *(
                         last.get(k, float("nan")) for k in ("loss_pos", "loss_neg")),  # none: image_loss off
                     last["lr"], last["grad_norm"], last["samples_per_s"], *(
                         last.get(k, float("nan")) for k in ("sampled_classes", "positives", "negatives")))
            if "region_loss" in last:
                log.info("step %d regions: loss %.4f (image loss %s) valid regions %d neg/region %.0f sampled %d",
                         t.step, last["region_loss"], f"{last['image_loss']:.4f}" if "image_loss" in last else "off",
                         last["regions_valid"], last["region_negatives"], last["region_sampled_classes"])

    def finish(self) -> None:
        self.tracker.finish()
