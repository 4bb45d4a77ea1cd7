"""Loss heads: what the trainer (training/trainer.py) loops over to turn model outputs into loss.

A head owns one loss term: its parameters (class centers: a PartialFC, class-sharded over the
ranks) and their optimizer, its weight in the total loss, its label source (the Batch fields it
reads, training/data.py), the model output it reads, its LR multiplier on the backbone's
schedule, its checkpoint shard folder and its metric names. The trainer names no head; per
micro-batch it runs

    outputs = model_outputs(module, engine(x, **every head's forward_kwargs))   # name -> tensor
    loss = sum(head.weight x head.loss(outputs, batch, micro) over the heads in the loss)

then one backward; at the accumulation boundary each head's optimizer steps (`finish_step`).
Checkpoints save and load each head's shards in its folder (training/checkpoint.py), the
trainer state and the metrics carry what each head adds. A model output no head reads gets a
zero gradient (DeepSpeed expects a gradient for every parameter).

The heads are registered from the config in one place, `configured_heads`:
- "image" (always): MLCD over the K image clusters, on the image embedding, labels = Batch.labels;
  shards in partial_fc/; its terms keep their plain names (loss_pos, sampled_classes, ...) plus
  image_loss. With train.regions.image_loss=false it is built and checkpointed, not in the loss.
- "region" (train.regions.enabled, RICE): the region classes (clusters K + OCR tokens V) on the
  Region Transformer's per-box embeddings (it asks for training/regions.py's MLCDRegionEncoder
  and for the region loader, training/region_data.py), labels = Batch.region_labels, padding rows
  masked by Batch.region_valid; shards in region_fc/; terms prefixed region_; its own seed stream
  (seed + REGION_SEED) and lr_mult.
- "clip" (train.objective=clip, the baseline): symmetric InfoNCE of the image embedding against
  a text tower's caption embedding (training/clip_head.py); the image head stays built, out of
  the loss; its text tower in clip_text/.
A further loss (a distillation term) is a Head subclass added there; the loop, checkpoints and
metrics pick it up unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.core.config import ConfigError
from training.checkpoint import load_centers, save_centers
from training.data import Batch, find_parts, make_loader
from training.model import MLCDEncoder, ModelConfig, build_model
from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer

REGION_SEED = 1 << 20  # the region centers' init and sampling: seed + REGION_SEED (another stream)


@dataclass(frozen=True)
class DataSource:
    """Where the shards are and how an epoch's Batches are made, for what the heads read.
    find_parts(train_cfg) -> parts; make_loader(parts, train_cfg, image_size, num_classes, seed,
    rank, epoch, num_batches, start) -> an iterable of Batch (training/data.py's is the default)."""
    find_parts: Callable
    make_loader: Callable


IMAGES = DataSource(
    lambda cfg: find_parts(cfg.data, cfg.loss.labels_used),
    lambda parts, cfg, size, num_classes, seed, rank, epoch, n, start: make_loader(
        parts, cfg.data, size, cfg.loss.labels_used, num_classes, seed, rank, epoch, n, start=start))


class Head:
    """One loss term (see the module doc). Subclasses set the attributes and implement `build`,
    `loss`, `save`, `load`; the hooks below default to "nothing extra"."""
    name: str = ""            # metric names, trainer.head(name)
    folder: str = ""          # checkpoint shard folder inside a step folder
    output: str = "image"     # the model output it reads (model_outputs)
    weight: float = 1.0       # total loss = sum of weight x head loss
    in_loss: bool = True      # False: built and checkpointed, but not trained
    lr_mult: float = 1.0      # its LR = the backbone's scheduled LR x lr_mult
    summed: tuple[str, ...] = ()  # terms that are per-step counts: summed over micro-batches

    opt: torch.optim.Optimizer

    def build(self, dim: int, ctx, seed: int, device, optim) -> None:
        """Its parameters and optimizer, once the model (of output width `dim`) exists."""
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch, micro: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(its loss, same on every rank; its detached terms, already named for the metrics)."""
        raise NotImplementedError

    def save(self, step_dir: Path) -> None:
        raise NotImplementedError

    def load(self, step_dir: Path, world_size: int) -> None:
        """From a checkpoint saved on `world_size` ranks (re-sharded when that differs)."""
        raise NotImplementedError

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def extends_model(self) -> bool:
        """True when the model must be `model(model_cfg)` (at most one head may say so)."""
        return False

    def model(self, model_cfg: ModelConfig) -> MLCDEncoder:
        raise NotImplementedError

    def data_source(self) -> DataSource | None:
        """The loader this head needs, None: the plain image loader is enough."""
        return None

    def forward_kwargs(self, batch: Batch, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Extra model forward inputs it needs from the batch (on the device)."""
        return {}

    def init_new_run(self, cfg) -> None:
        """A new run (no checkpoint to resume): initial values from the config, if any."""

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * self.lr_mult

    def finish_step(self, unscale: float | None, skip: bool) -> None:
        """The accumulation boundary: undo fp16's loss scale (`unscale`: engine.backward scaled
        these grads too), step unless DeepSpeed skipped the step (fp16 overflow), zero grads."""
        if unscale is not None:
            for p in self.params():
                if p.grad is not None:
                    p.grad.div_(unscale)
        if not skip:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> dict:
        """What it adds to trainer_state.json (export and resume read it)."""
        return {}

    def describe(self) -> str:
        """Its start-up log line."""
        return self.name

    def log_line(self, last: dict) -> str | None:
        """An extra line for the step log (None: the main line says enough)."""
        return None


class ClassHead(Head):
    """Class discrimination of one model output against its own class centers (PartialFC + the
    configured loss). `targets` is the label source: the image labels here."""

    def __init__(self, name: str, folder: str, num_classes: int, pfc_cfg: PartialFCConfig, loss_cfg,
                 weight: float = 1.0, in_loss: bool = True, lr_mult: float | None = None,
                 seed_offset: int = 0, prefix: str = ""):
        self.name, self.folder, self.num_classes = name, folder, num_classes
        self.pfc_cfg, self.loss_cfg, self.weight, self.in_loss = pfc_cfg, loss_cfg, weight, in_loss
        self.lr_mult = pfc_cfg.lr_mult if lr_mult is None else lr_mult
        self.seed_offset, self.prefix = seed_offset, prefix

    def build(self, dim: int, ctx, seed: int, device, optim) -> None:
        # grad_scale = W: the all-gather's backward undoes DeepSpeed's average over ranks
        self.pfc = PartialFC(self.num_classes, dim, self.pfc_cfg, self.loss_cfg, ctx.rank, ctx.world_size, ctx,
                             seed=seed + self.seed_offset, grad_scale=float(ctx.world_size)).to(device)
        self.opt = make_optimizer(self.pfc, self.pfc_cfg, optim.lr, optim.weight_decay,
                                  (optim.beta1, optim.beta2), optim.eps)

    def params(self) -> list[torch.Tensor]:
        return [self.pfc.weight]

    def targets(self, batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(labels (rows, l), valid (rows,) bool or None) for the rows of its model output."""
        return batch.labels.to(device), None

    def loss(self, outputs, batch, micro):
        emb = outputs[self.output]
        labels, valid = self.targets(batch, emb.device)
        loss, terms = self.pfc(emb, labels, micro, valid=valid)
        out = {self.prefix + k: v for k, v in terms.items()}
        out[f"{self.name}_loss"] = loss.detach()
        return loss, out

    def save(self, step_dir: Path) -> None:
        save_centers(step_dir, self.pfc, self.opt, self.folder)

    def load(self, step_dir: Path, world_size: int) -> None:
        load_centers(step_dir, self.pfc, self.opt, world_size, self.folder)

    def describe(self) -> str:
        return (f"{self.name}: K={self.num_classes} classes ({self.pfc.num_local} per rank)"
                f"{'' if self.in_loss else ', not in the loss'}")


class ImageHead(ClassHead):
    """MLCD's image head; train.init_centers_from can seed its centers for a new run."""

    def init_new_run(self, cfg) -> None:
        from training.init_weights import load_initial_centers
        load_initial_centers(self.pfc, cfg)


class RegionClassHead(ClassHead):
    """RICE's region head: one row per box (B x R rows), padding rows masked (training/regions.py,
    training/region_data.py)."""
    output = "region"
    summed = ("regions_valid",)

    def __init__(self, rcfg, loss_cfg, num_classes: int):
        if num_classes < 1:
            raise ConfigError(f"train.regions: region_classes={num_classes}, must be >= 1 "
                              f"(label_space.json's num_classes)")
        super().__init__("region", "region_fc", num_classes, rcfg.partial_fc,
                         dataclasses.replace(loss_cfg, num_labels=rcfg.num_labels), weight=rcfg.weight,
                         seed_offset=REGION_SEED, prefix="region_")
        self.rcfg = rcfg

    def extends_model(self) -> bool:
        return True

    def model(self, model_cfg: ModelConfig) -> MLCDEncoder:
        from training.regions import MLCDRegionEncoder, RegionHeadConfig
        return MLCDRegionEncoder(model_cfg, RegionHeadConfig(layers=self.rcfg.layers))

    def data_source(self) -> DataSource:
        from training.region_data import RegionSpec, find_region_parts, make_region_loader
        spec = RegionSpec.of(self.rcfg, self.num_classes)
        return DataSource(
            lambda cfg: find_region_parts(cfg.data, spec, cfg.loss.labels_used),
            lambda parts, cfg, size, num_classes, seed, rank, epoch, n, start: make_region_loader(
                parts, cfg.data, size, cfg.loss.labels_used, num_classes, spec, seed, rank, epoch, n, start=start))

    def forward_kwargs(self, batch, device, dtype):
        return {"boxes": batch.boxes.to(device, dtype), "valid": batch.region_valid.to(device, torch.bool)}

    def targets(self, batch, device):
        lab = batch.region_labels
        return lab.reshape(-1, lab.shape[-1]).to(device), batch.region_valid.to(device, torch.bool).reshape(-1)

    def loss(self, outputs, batch, micro):
        loss, terms = super().loss(outputs, batch, micro)
        terms["regions_valid"] = terms.pop("region_valid_rows")  # of the global micro-batch
        return loss, terms

    def state(self) -> dict:
        return {"region_classes": self.num_classes, "region_head": {"layers": self.rcfg.layers}}

    def describe(self) -> str:
        r = self.rcfg
        return (f"regions: {self.num_classes} region classes ({self.pfc.num_local} per rank), {r.per_image} "
                f"regions per image, {r.layers} head layer(s), loss = {'image loss + ' if r.image_loss else ''}"
                f"{r.weight:g} x region loss")

    def log_line(self, last: dict) -> str:
        image = f"{last['image_loss']:.4f}" if "image_loss" in last else "off"
        return (f"regions: loss {last['region_loss']:.4f} (image loss {image}) valid regions "
                f"{last['regions_valid']:.0f} neg/region {last['region_negatives']:.0f} sampled "
                f"{last['region_sampled_classes']:.0f}")


class ClipHead(Head):
    """The CLIP baseline (train.objective=clip): symmetric InfoNCE of the image embedding against
    a small text tower's caption embedding over the global batch, learnable temperature; the
    tower, loss, loader and checkpoint file live in training/clip_head.py."""
    name, folder, output = "clip", "clip_text", "image"

    def __init__(self, cfg):
        self.cfg = cfg

    def build(self, dim: int, ctx, seed: int, device, optim) -> None:
        from training.clip_head import build_tower
        self.ctx = ctx
        self.tower, self.opt = build_tower(self.cfg, dim, seed + 7, device, optim)

    def data_source(self) -> DataSource:
        from training.clip_head import CaptionStream
        from training.data import loader
        n = self.cfg.context_length
        return DataSource(IMAGES.find_parts, lambda parts, cfg, size, num_classes, seed, rank, epoch, nb, start: loader(
            CaptionStream(parts, cfg.data, size, cfg.loss.labels_used, num_classes, seed, rank, epoch, nb, start,
                          context_length=n), cfg.data))

    def loss(self, outputs, batch, micro):
        from training.clip_head import clip_loss
        if batch.texts is None:
            raise ValueError("train.objective=clip: the batch has no captions (Batch.texts)")
        return clip_loss(self.tower, outputs[self.output], batch.texts, self.ctx)

    def average_grads(self) -> None:
        from training.clip_head import average_grads
        average_grads(self.ctx, self.params())

    def finish_step(self, unscale, skip) -> None:
        from training.clip_head import MAX_LOGIT_SCALE
        self.average_grads()
        super().finish_step(unscale, skip)
        with torch.no_grad():  # open_clip clamps the temperature after each step
            self.tower.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def save(self, step_dir: Path) -> None:
        from training.clip_head import save_tower
        if self.ctx.is_main:  # replicated: rank 0's copy is everyone's
            save_tower(step_dir / self.folder / "text.safetensors", self.tower, self.opt)

    def load(self, step_dir: Path, world_size: int) -> None:
        from training.clip_head import load_tower
        load_tower(step_dir / self.folder / "text.safetensors", self.tower, self.opt)

    def state(self) -> dict:
        return {"objective": "clip", "clip": dataclasses.asdict(self.cfg)}

    def describe(self) -> str:
        c, n = self.cfg, sum(p.numel() for p in self.tower.parameters())
        return (f"clip: text tower width {c.width} x {c.layers} layers, {c.context_length} tokens "
                f"({n / 1e6:.2f}M params), symmetric InfoNCE over the global batch, learnable temperature")

    def log_line(self, last: dict) -> str:
        return f"clip: loss {last['clip_loss']:.4f} logit scale {last['clip_logit_scale']:.2f}"


# ---------------------------------------------------------------- registration (the one place)

def configured_heads(cfg, num_classes: int, region_classes: int = 0) -> list[Head]:
    """The heads a TrainConfig asks for, in loss order. region_classes: K + V of the region
    label space (train.regions.enabled only)."""
    regions = cfg.regions
    lr_mult = 0.0 if cfg.finetune.freeze_centers else cfg.partial_fc.lr_mult
    heads: list[Head] = [ImageHead("image", "partial_fc", num_classes, cfg.partial_fc, cfg.loss, lr_mult=lr_mult,
                                   in_loss=not regions.enabled or regions.image_loss)]
    if regions.enabled:
        heads.append(RegionClassHead(regions, cfg.loss, region_classes))
    if cfg.objective == "clip":  # the baseline: same image tower, contrastive loss only
        heads[0].in_loss = False
        heads.append(ClipHead(cfg.clip))
    return heads


# ---------------------------------------------------------------- what the trainer asks of all heads

def model_for(heads: Sequence[Head], model_cfg: ModelConfig) -> MLCDEncoder:
    """The plain MLCDEncoder, or the one a head extends it to (training/regions.py)."""
    owners = [h for h in heads if h.extends_model()]
    if len(owners) > 1:
        raise ConfigError(f"heads {', '.join(h.name for h in owners)} each need their own model; at most one may")
    return owners[0].model(model_cfg) if owners else build_model(model_cfg)


def data_source(heads: Sequence[Head]) -> DataSource:
    """The loader every head's fields come from (the plain image loader unless a head needs more)."""
    sources = [s for h in heads if (s := h.data_source()) is not None]
    if len(sources) > 1:
        raise ConfigError("more than one loss head needs its own data loader; at most one may")
    return sources[0] if sources else IMAGES


def model_outputs(module: nn.Module, out) -> dict[str, torch.Tensor]:
    """The model's forward result by name. Models return plain tensors or tuples (ZeRO-3's hooks
    only see those); `output_names` on the model class names them (MLCDEncoder: "image")."""
    names = getattr(module, "output_names", ("image",))
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(outs) != len(names):
        raise ValueError(f"{type(module).__name__} returned {len(outs)} outputs, output_names has {names}")
    return dict(zip(names, outs))


def forward_kwargs(heads: Sequence[Head], batch: Batch, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    kw: dict[str, torch.Tensor] = {}
    for h in heads:
        kw.update(h.forward_kwargs(batch, device, dtype))
    return kw


def total_loss(heads: Sequence[Head], outputs: dict[str, torch.Tensor], batch: Batch, micro: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum of weight x loss over the heads in the loss, + 0 x every output no such head read (so
    every parameter gets a gradient, as DeepSpeed expects); their terms merged."""
    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = {}
    read = set()
    for h in heads:
        if not h.in_loss:
            continue
        value, t = h.loss(outputs, batch, micro)
        value = value if h.weight == 1.0 else h.weight * value
        loss = value if loss is None else loss + value
        terms.update(t)
        read.add(h.output)
    if loss is None:
        raise ConfigError("no loss head is in the loss (nothing would be trained)")
    for name, out in outputs.items():
        if name not in read:
            loss = loss + 0.0 * out.sum()
    return loss, terms
