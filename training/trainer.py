"""The Trainer: builds the DeepSpeed engine (backbone), the loss heads (training/heads.py: each
its class centers outside DeepSpeed and their optimizer) and the run state once; ``fit()`` runs
the loop (``train_step`` -> ``forward_backward``); a ``CheckpointManager`` decides when to save,
what to keep and how to resume.

Per step: for each micro-batch (a training/data.py Batch), the model's outputs -> every head's
loss over the global batch, weighted and summed -> one backward (DeepSpeed averages backbone
grads over ranks; the all-gather's backward multiplies by W to undo that, since each loss is
already a global mean) -> engine.step(); at the accumulation boundary every head's optimizer
steps too. The loop, checkpoints, trainer state and metrics go over the configured heads and
name none: training/heads.py's `configured_heads` registers them from the config (the image
head; with RICE also a second head that brings its own model and loader).

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.config import ConfigError, RunConfig, to_dict
from pipeline.core.dist import DistContext
from pipeline.core.entry import StageError
from pipeline.core.io import atomic_write_text
from pipeline.core.tracking import Tracker, budgeted_eta, fmt_duration, progress
from training import checkpoint as ckpt
from training.config import CheckpointConfig, OptimConfig, TrainConfig, schedule_phase
from training.data import Batch, epoch_length, make_loader, normalize_uint8
from training.eval_hook import EvalDuringTraining
from training.heads import (
    Head,
    configured_heads,
    data_source,
    forward_kwargs,
    model_for,
    model_outputs,
    total_loss,
)
from training.init_weights import FinetuneConfig, load_initial_weights, param_groups
from training.model import forward_flops
from training.safe_load import every_rank_reads
from training.validate import TrainInputError

log = logging.getLogger("mlcd.train")


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
    groups = param_groups(model, cfg.weight_decay, ft)  # type: ignore[arg-type]  # an MLCDEncoder; decay groups + fine-tune knobs (init_weights.py)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    out: dict[str, Any] = {
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

def to_model_input(images: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A batch's images as the model takes them: uint8 (B, 3, H, W) goes to the device as bytes
    (4x less to copy than float32) and is CLIP-normalized there (training/data.py's
    normalize_uint8, the loader's float math exactly), then cast; float images are already
    normalized and only moved/cast."""
    if images.dtype != torch.uint8:
        return images.to(device, dtype, non_blocking=True)
    return normalize_uint8(images.to(device, non_blocking=True), dtype)


def forward_backward(engine, heads: Sequence[Head], batch: Batch, micro: int, step: int
                     ) -> tuple[float, dict[str, float]]:
    dtype = next(engine.module.parameters()).dtype
    x = to_model_input(batch.images, engine.device, dtype)
    outputs = model_outputs(engine.module, engine(x, **forward_kwargs(heads, batch, engine.device, x.dtype)))
    loss, terms = total_loss(heads, outputs, batch, micro)
    value = loss.item()  # identical on every rank (a global-batch loss): all stop together
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {step + 1} (micro-batch {micro}); stopped before "
                               f"any optimizer step used it. Lower optim.lr or check the data")
    engine.backward(loss)
    engine.step()  # an optimizer step only at the accumulation boundary
    return value, {k: float(v) for k, v in terms.items()}


def train_step(engine, heads: Sequence[Head], micro_batches: list[Batch], step: int, cfg: TrainConfig
               ) -> dict[str, float]:
    lr = lr_at(step, cfg.optim, cfg.steps)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay (train.finetune)
    for h in heads:
        h.set_lr(lr)
    gas = len(micro_batches)
    summed = {k for h in heads for k in h.summed}  # counts per step; other terms: micro-batch means
    sums: dict[str, float] = {}
    skipped_before = engine.skipped_steps
    for i, batch in enumerate(micro_batches):
        loss, terms = forward_backward(engine, heads, batch, step * gas + i, step)
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + (v if k in summed else v / gas)
    # fp16: engine.backward scaled the heads' grads too; an overflow made DeepSpeed skip: so do we
    unscale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if cfg.deepspeed.precision == "fp16" else None
    for h in heads:
        h.finish_step(unscale, skip=engine.skipped_steps != skipped_before)
    gn = engine.get_global_grad_norm()
    sums.update(lr=lr, grad_norm=float(gn) if gn is not None else float("nan"))
    return sums


def micro_batches(cfg: TrainConfig, parts, image_size: int, num_classes: int, seed: int, rank: int,
                  start_step: int, loader=None) -> Iterator[list]:
    """Lists of grad_accum micro-batches from `start_step` on, epoch by epoch (training/data.py).
    loader(epoch, epoch_len, start): an epoch's batches from batch `start` on (None: data.py's
    make_loader; the Trainer passes its heads' data source's)."""
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


def find_train_parts(cfg: TrainConfig, num_classes: int, region_classes: int = 0) -> list:
    """The shards to train on, with what the configured heads read (training/heads.py)."""
    return data_source(configured_heads(cfg, num_classes, region_classes)).find_parts(cfg)


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
        resume = self.resume
        if resume is None or self.exact:
            return None
        log.warning("resuming a %s-rank ZeRO-%s checkpoint on %d ranks: centers re-sharded, backbone "
                    "weights from the fp32 consolidation, backbone optimizer moments restart",
                    self.state.get("world_size"), self.state.get("zero_stage"), self.ctx.world_size)
        return every_rank_reads(self.ctx, lambda: ckpt.load_backbone_state_dict(resume))

    def load(self, engine, heads: Sequence[Head]) -> tuple[int, int]:
        """(step, samples_seen) after restoring the engine (exact resumes) and every head (its
        centers re-sharded when the world size differs). Every rank first checks the files it will
        read, and a bad file on any rank stops every rank with that one line
        (training/safe_load.py:every_rank_reads) before DeepSpeed's loader, which talks to the
        other ranks, runs."""
        resume = self.resume
        if resume is None:
            return 0, 0
        world = int(self.state["world_size"])
        pfcs = [(h.folder, p) for h in heads if (p := getattr(h, "pfc", None)) is not None]
        centers = [(world, p.num_classes, p.weight.shape[1], folder) for folder, p in pfcs]
        every_rank_reads(self.ctx, lambda: ckpt.check_resume(resume, self.ctx.rank, self.exact, centers))

        def restore() -> None:
            if self.exact:
                ckpt.load_engine(engine, resume)  # weights-only, DeepSpeed's own files included
            for h in heads:
                h.load(resume, world)
        every_rank_reads(self.ctx, restore)
        step, seen = int(self.state["step"]), int(self.state["samples_seen"])
        log.info("resumed from %s (step %d, %d samples seen)", self.resume, step, seen)
        self.saved_at = step
        return step, seen

    def due(self, step: int, total: int, stopping: bool) -> bool:
        return step % self.cfg.every == 0 or step == total or stopping

    def save(self, step: int, engine, heads: Sequence[Head], state: dict) -> Path:
        """Collective: every rank calls it."""
        out = ckpt.save(self.root, step, engine, heads, state, self.ctx, self.cfg.keep)
        self.saved_at = step
        return out

    def latest(self) -> Path | None:
        return ckpt.find_latest(self.root)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Built once: backbone engine, the loss heads (each its centers and optimizer), the resume
    state. ``fit(stream)`` trains from ``self.step`` to ``cfg.steps``; ``train_step(batches)`` is
    one optimizer step."""

    def __init__(self, run: RunConfig, cfg: TrainConfig, ctx: DistContext, num_classes: int,
                 checkpoints: CheckpointManager | None = None, out_dir: str | Path | None = None,
                 region_classes: int = 0):
        """num_classes: K of the image head; region_classes: K + V of the region head's label
        space (train.regions.enabled only); head registration: training/heads.py."""
        self.run, self.cfg, self.ctx, self.num_classes = run, cfg, ctx, num_classes
        self.heads = configured_heads(cfg, num_classes, region_classes)
        self.checkpoints = checkpoints
        self.out = Path(out_dir) if out_dir is not None else None
        self.model_cfg = dataclasses.replace(
            cfg.model, grad_checkpointing=cfg.model.grad_checkpointing or cfg.deepspeed.activation_checkpointing)
        self.global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * ctx.world_size
        self.step, self.samples_seen = 0, 0
        self.evals = EvalDuringTraining(cfg, self.model_cfg, ctx, run.seed)  # train.eval_every (0: off)
        self.build()

    def build(self) -> None:
        import deepspeed
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(self.run.seed)  # identical backbone init on every rank
        model = model_for(self.heads, self.model_cfg)  # MLCDEncoder, or the one a head extends
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self._init_weights(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=make_backbone_optimizer(model, cfg.optim, cfg.finetune),
            config=deepspeed_config(cfg),
            dist_init_required=False)
        if cfg.deepspeed.zero_stage == 3:
            zero3_register_direct_params(self.engine.module)
        for h in self.heads:
            h.build(model.out_dim, ctx, self.run.seed, self.engine.device, cfg.optim)
        if self.checkpoints is not None:
            self.step, self.samples_seen = self.checkpoints.load(self.engine, self.heads)
        if not self._resuming:
            for h in self.heads:
                h.init_new_run(cfg)  # e.g. train.init_centers_from (a new run only)

    def head(self, name: str) -> Head:
        found = [h for h in self.heads if h.name == name]
        if not found:
            raise KeyError(f"no loss head {name!r} (configured: {', '.join(h.name for h in self.heads)})")
        return found[0]

    @property
    def _resuming(self) -> bool:
        return self.checkpoints is not None and self.checkpoints.resume is not None

    def _init_weights(self, model: nn.Module) -> None:
        """The one place initial backbone weights are set (after the seeded init, before the
        engine exists): a checkpoint resumed onto another layout, or, for a new run,
        `train.init_from` (training/init_weights.py; a checkpoint in the run folder wins)."""
        if self.checkpoints is not None and self._resuming:
            self.init_from = self.checkpoints.state.get("init_from")
            sd = self.checkpoints.backbone_weights()
            if sd is not None:
                model.load_state_dict(sd)
            return
        self.init_from = load_initial_weights(model, self.cfg, self.num_classes, self.ctx,  # type: ignore[arg-type]
                                              self.out if self.out is not None else self.cfg.out_dir)

    def train_step(self, batches: list) -> dict[str, float]:
        try:
            return train_step(self.engine, self.heads, batches, self.step, self.cfg)
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
                "last_metrics": last, **{k: v for h in self.heads for k, v in h.state().items()}}

    def stream(self, parts) -> Iterator[list[Batch]]:
        """parts: find_train_parts's (the shards with what the heads read)."""
        size = self.model_cfg.resolved().image_size
        source = data_source(self.heads)

        def loader(epoch: int, n: int, start: int):
            return source.make_loader(parts, self.cfg, size, self.num_classes, self.run.seed, self.ctx.rank,
                                      epoch, n, start)
        return micro_batches(self.cfg, parts, size, self.num_classes, self.run.seed, self.ctx.rank, self.step,
                             loader)

    def fit(self, stream: Iterator[list]) -> dict:
        cfg, ctx = self.cfg, self.ctx
        metrics = _Metrics(self, self.out / "metrics.jsonl" if self.out else None)
        bar = progress(cfg.steps, "train", ctx, unit="step", initial=self.step, share_dir=self.out, replicated=True,
                       deadline_s=cfg.time_budget_s)
        t_start, last = time.perf_counter(), {}
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batches = next(stream)  # blocked here = the step waited for data (loader too slow)
            t1 = time.perf_counter()
            last = self.train_step(batches)
            self.step += 1
            self.samples_seen += self.global_batch
            bar.update(1)
            stopping = self._over_budget(t_start)
            step_s = time.perf_counter() - t1
            evals = self.evals.after_step(self.engine.module, self.step, stopping)  # {} unless due
            metrics.add(last, batches, wait_s=t1 - t0, step_s=step_s, final=stopping, evals=evals)
            if self.checkpoints is not None and self.checkpoints.due(self.step, cfg.steps, stopping):
                self.checkpoints.save(self.step, self.engine, self.heads, self.state(last))
            if stopping:
                log.warning("time budget %.0f s reached at step %d of %d; checkpoint saved (rerun to continue)",
                            cfg.time_budget_s, self.step, cfg.steps)
                break
        bar.close()
        metrics.finish()
        saved = self.checkpoints.saved_at if self.checkpoints is not None else None
        summary = {"step": self.step, "samples_seen": self.samples_seen,
                   "checkpoint": str(self.checkpoints.root / ckpt.tag_for(saved))
                   if self.checkpoints is not None and saved is not None else None,
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


DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, NVIDIA datasheets


class _Metrics:
    """Every `run.log_every` steps (and at the last step, also one cut short by the time budget):
    the window's mean loss, throughput (global and per device), the share of step time spent
    waiting for data, MFU, memory and ETA, to (rank 0) metrics.jsonl, the log and wandb. wandb
    keys are namespaced (train/, data/, sys/); metrics.jsonl keeps flat keys (the reports read
    them). metrics.jsonl first drops lines a killed run logged after its last checkpoint."""

    def __init__(self, trainer: Trainer, path: Path | None):
        self.t, self.path = trainer, path
        ctx = trainer.ctx
        if ctx.is_main and path is not None:
            old = path.read_text(errors="replace").splitlines() if path.exists() else []
            atomic_write_text(path, "".join(ln + "\n" for ln in _kept_metrics(path, old, trainer.step)))
        self.tracker = Tracker(trainer.run, ctx, str(path.parent if path else "."), "train",
                               {"run": to_dict(trainer.run), "train": to_dict(trainer.cfg)})
        self.t_start = self.t_log = time.perf_counter()
        self.n = self.skipped = self.steps = 0
        self.loss_sum = self.wait_s = self.step_s = self.eval_s = 0.0
        model = trainer.model_cfg
        self.flops_per_sample = 3 * forward_flops(model, head=False)  # backward = 2x forward
        self.peak = _peak_flops(trainer.cfg.peak_tflops, ctx.device)

    def add(self, last: dict, batches: list[Batch], wait_s: float = 0.0, step_s: float = 0.0,
            final: bool = False, evals: dict | None = None) -> None:
        """evals: eval/ keys of this step (training/eval_hook.py): logged now, in this step's
        record; their time is left out of the window's throughput."""
        t = self.t
        self.eval_s += (evals or {}).get("eval/seconds", 0.0)
        self.n += t.global_batch
        self.steps += 1
        self.skipped += sum(int(b.skipped) for b in batches)
        self.loss_sum += last["loss"]
        self.wait_s += wait_s
        self.step_s += step_s
        if t.step % t.run.log_every and t.step != t.cfg.steps and not final and not evals:
            return
        now = time.perf_counter()
        dt, w = now - self.t_log - self.eval_s, t.ctx.world_size
        rate = self.n / dt
        last.update(loss_avg=self.loss_sum / self.steps, samples_per_s=rate, samples_per_s_per_device=rate / w,
                    data_wait_s=self.wait_s / self.steps, step_s=self.step_s / self.steps,
                    data_wait_share=self.wait_s / max(self.wait_s + self.step_s, 1e-12),
                    skipped_unlabeled=self.skipped, samples_seen=t.samples_seen, elapsed_s=now - self.t_start,
                    eta_s=self._eta(t, now, dt))
        if self.peak:
            last["mfu"] = rate / w * self.flops_per_sample / self.peak
        if torch.cuda.is_available():
            last["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        last.update(evals or {})
        self.n = self.steps = self.skipped = 0
        self.loss_sum = self.wait_s = self.step_s = self.eval_s = 0.0
        self.t_log = now
        self.tracker.log(namespaced(last), t.step)
        if t.ctx.is_main:
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": t.step, **last}) + "\n")
            self._log(last)

    def _eta(self, t, now: float, dt: float) -> float:
        """Seconds to the planned last step at this window's rate, or to the time budget's end if
        that comes first (a budgeted run stops there: train.time_budget_s)."""
        return budgeted_eta((t.cfg.steps - t.step) * dt / self.steps, t.cfg.time_budget_s, now - self.t_start)

    def _log(self, last: dict) -> None:
        t = self.t
        log.info("step %d/%d loss %.4f (window mean %.4f; pos %.4f neg %.4f) lr %.2e gnorm %.3g | %.1f samples/s "
                 "(%.1f per device%s) data wait %.0f%% | ETA %s | sampled %d pos %d neg/image %.0f",
                 t.step, t.cfg.steps, last["loss"], last["loss_avg"],
                 *(last.get(k, float("nan")) for k in ("loss_pos", "loss_neg")),  # none: image_loss off
                 last["lr"], last["grad_norm"], last["samples_per_s"], last["samples_per_s_per_device"],
                 f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else "", 100 * last["data_wait_share"],
                 fmt_duration(last["eta_s"]),
                 *(last.get(k, float("nan")) for k in ("sampled_classes", "positives", "negatives")))
        for h in t.heads:
            line = h.log_line(last)
            if line:
                log.info("step %d %s", t.step, line)

    def finish(self) -> None:
        self.tracker.finish()


DATA_KEYS = ("data_wait_s", "data_wait_share", "skipped_unlabeled")
SYS_KEYS = ("max_mem_gb", "mfu", "samples_per_s_per_device", "elapsed_s", "eta_s", "step_s")


def namespaced(last: dict) -> dict:
    """wandb's keys: data/ (loader), sys/ (device, time), eval/ as they are, train/ (the rest)."""
    return {(k if k.startswith("eval/") else f"data/{k}" if k in DATA_KEYS else f"sys/{k}" if k in SYS_KEYS
             else f"train/{k}"): v
            for k, v in last.items()}


def _peak_flops(peak_tflops: float, device: torch.device) -> float:
    """The MFU denominator (FLOP/s): train.peak_tflops, else a known GPU's datasheet, else 0 (none)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return 1e12 * next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), 0.0)
    return 0.0


def _kept_metrics(path: Path, lines: list[str], step: int) -> list[str]:
    """The metrics lines a resume at `step` keeps: those logged up to its checkpoint. A line that
    is not a JSON object with a step (the torn last line of a killed write, or damage anywhere)
    is dropped with a warning naming it: the file is a log, never an input, so a resume goes on."""
    kept = []
    for i, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
            s = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            if ln.strip():
                log.warning("%s: line %d of %d is not a metrics record (%s write?); dropped", path, i,
                            len(lines), "a torn last" if i == len(lines) else "a damaged")
            continue
        if s <= step:
            kept.append(ln)
    return kept
