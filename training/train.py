"""Stage 3: MLCD pretraining. DeepSpeed ZeRO for the backbone, class-sharded PartialFC for the
K class centers (outside DeepSpeed), the MLCD multi-label loss (or UNICOM's ArcFace softmax).

    torchrun --nproc_per_node 2 -m training.train --config configs/demo.yaml [train.k=v ...]
    deepspeed --num_gpus 8 --module training.train --config ...     (same code path)
    python -m training.train --config ...                           (one process)

Resumable at any step: re-running the same command continues from the newest complete
checkpoint in `train.out_dir/checkpoints` (see training/checkpoint.py); the data stream is a
function of (seed, step) (training/data.py), so a resumed run follows the uninterrupted one.
A non-finite loss stops the run before any optimizer step uses it; the last checkpoint stays.

Per step: for each micro-batch, embeddings -> PartialFC loss over the global batch -> backward
(DeepSpeed averages backbone grads over ranks; the all-gather's backward multiplies by W to undo
that, since the loss is already a global mean) -> engine.step(); at the accumulation boundary the
centers' optimizer steps too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ConfigError, RunConfig, check, cli_main, load_config, prepare_out_dir, to_dict
from pipeline.dist import DistContext, init_distributed
from pipeline.io import atomic_write_text
from pipeline.tracking import Tracker, progress, setup_logging
from training import checkpoint as ckpt
from training.data import TrainDataConfig, find_parts, make_loader, num_classes_from_centroids
from training.init_weights import FinetuneConfig, load_initial_centers, load_initial_weights, param_groups
from training.loss import LossConfig
from training.model import ModelConfig, build_model
from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer

log = logging.getLogger("mlcd.train")


@dataclass
class OptimConfig:
    name: str = "adamw"           # adamw | sgd (momentum 0.9; used by the exactness tests)
    lr: float = 1e-3              # paper: AdamW lr 1e-3, wd 0.2
    weight_decay: float = 0.2     # not on biases, norms, class/position embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100       # linear warmup, then cosine to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        check(self.name in ("adamw", "sgd"), "name", self.name, "must be adamw or sgd")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2           # 0 = plain data parallel; 1/2/3 partition optimizer/grads/params
    precision: str = "bf16"       # bf16 | fp16 | fp32 (fp32 on CPU)
    grad_clip: float = 1.0        # backbone gradient norm clip (0 = off); centers are not clipped
    grad_accum: int = 1
    activation_checkpointing: bool = False  # recompute blocks in backward (~1/3 more compute)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into DeepSpeed's config (offload, ...)

    def __post_init__(self):
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        check(self.precision in ("bf16", "fp16", "fp32"), "precision", self.precision,
              "must be bf16, fp16 or fp32")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 500              # steps between checkpoints (and one at the end)
    keep: int = 2                 # complete checkpoints kept (older ones are deleted)

    def __post_init__(self):
        check(self.every >= 1, "every", self.every, "must be >= 1")
        check(self.keep >= 0, "keep", self.keep, "must be >= 0 (0 = keep all)")


@dataclass
class TrainConfig:
    out_dir: str = "${run.out_dir}/train"
    centroids: str = "${run.out_dir}/clusters/centroids.npy"  # K when partial_fc.num_classes = 0
    steps: int = 1000             # optimizer steps (the LR schedule's length)
    time_budget_s: float = 0.0    # stop early with a checkpoint after this long (0 = no limit)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A new run's starting weights (training/init_weights.py); a checkpoint in out_dir wins.
    init_from: str = ""           # run/step folder of ours, HF folder, or state file; "" = random init
    init_centers_from: str = ""   # run/step folder of ours with the same K; "" = fresh centers
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.time_budget_s >= 0, "time_budget_s", self.time_budget_s, "must be >= 0")


# Keys that may change when a run is continued (they do not change what is learned; a run folder
# may also be moved or copied).
RESUMABLE_KEYS = ("train.steps", "train.time_budget_s", "train.checkpoint", "train.data.workers",
                  "train.data.pin_memory", "run.out_dir", "train.out_dir",
                  "train.init_from", "train.init_centers_from")  # read only before the first checkpoint


class TrainingDiverged(FloatingPointError):
    pass


# ---------------------------------------------------------------- pieces

def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_backbone_optimizer(model: torch.nn.Module, cfg: OptimConfig, ft: FinetuneConfig | None = None
                            ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, ft)
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


def _one_process_env() -> None:
    """`python -m training.train` without a launcher: DeepSpeed needs a process group, so make
    a 1-rank one (only when no launcher set the variables)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _collective_check(ctx: DistContext, fn) -> Any:
    """Runs fn on rank 0 and raises the same error on every rank (no rank left at a barrier)."""
    err, out = None, None
    if ctx.is_main:
        try:
            out = fn()
        except (ConfigError, OSError, ValueError) as e:
            err = (type(e).__name__, str(e))
    err = ctx.broadcast_object(err)
    if err:
        raise ConfigError(err[1]) if err[0] == "ConfigError" else RuntimeError(err[1])
    return ctx.broadcast_object(out)


# ---------------------------------------------------------------- the step

def forward_backward(engine, pfc: PartialFC, images: torch.Tensor, labels: torch.Tensor, micro: int,
                     step: int) -> tuple[float, dict[str, float]]:
    dtype = next(engine.module.parameters()).dtype
    emb = engine(images.to(engine.device, dtype, non_blocking=True))
    loss, terms = pfc(emb, labels.to(engine.device), micro)
    value = loss.item()  # identical on every rank (a global-batch loss): all stop together
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {step + 1} (micro-batch {micro}); stopped before "
                               f"any optimizer step used it. Lower optim.lr or check the data")
    engine.backward(loss)
    engine.step()  # an optimizer step only at the accumulation boundary
    return value, {k: float(v) for k, v in terms.items()}


def train_step(engine, pfc: PartialFC, pfc_opt, micro_batches: list, step: int, cfg: TrainConfig
               ) -> dict[str, float]:
    lr = lr_at(step, cfg.optim, cfg.steps)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay (train.finetune)
    for g in pfc_opt.param_groups:
        g["lr"] = 0.0 if cfg.finetune.freeze_centers else lr * cfg.partial_fc.lr_mult
    gas = len(micro_batches)
    sums: dict[str, float] = {}
    skipped_before = engine.skipped_steps
    for i, (images, labels, _) in enumerate(micro_batches):
        loss, terms = forward_backward(engine, pfc, images, labels, step * gas + i, step)
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + v / gas
    if cfg.deepspeed.precision == "fp16":  # engine.backward scaled the centers' grads too
        scale = float(getattr(engine.optimizer, "loss_scale", 1.0))
        pfc.weight.grad.div_(scale)
    if engine.skipped_steps == skipped_before:  # fp16 overflow: DeepSpeed skipped; so do we
        pfc_opt.step()
    pfc_opt.zero_grad(set_to_none=True)
    gn = engine.get_global_grad_norm()
    sums.update(lr=lr, grad_norm=float(gn) if gn is not None else float("nan"))
    return sums


def micro_batches(cfg: TrainConfig, parts, image_size: int, num_classes: int, seed: int, rank: int,
                  start_step: int) -> Iterator[list]:
    """Lists of grad_accum micro-batches from `start_step` on, epoch by epoch (training/data.py)."""
    gas = cfg.deepspeed.grad_accum
    epoch_len = cfg.data.epoch_batches or cfg.checkpoint.every * gas
    micro = start_step * gas
    group: list = []
    while True:
        epoch, j = divmod(micro, epoch_len)
        for batch in make_loader(parts, cfg.data, image_size, cfg.loss.labels_used, num_classes, seed,
                                 rank, epoch, epoch_len, start=j):
            group.append(batch)
            micro += 1
            if len(group) == gas:
                yield group
                group = []


# ---------------------------------------------------------------- the run

def train(run: RunConfig, cfg: TrainConfig, ctx: DistContext) -> dict:
    import deepspeed

    out = Path(cfg.out_dir)
    _collective_check(ctx, lambda: prepare_out_dir(out, run, {"run": run, "train": cfg}, "train",
                                                   ignore=RESUMABLE_KEYS))
    root = out / "checkpoints"
    if run.overwrite and ctx.is_main and root.exists():  # a fresh start must not auto-resume
        log.warning("run.overwrite: deleting %s and its metrics", root)
        shutil.rmtree(root)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    ctx.barrier()
    num_classes = cfg.partial_fc.num_classes or _collective_check(
        ctx, lambda: num_classes_from_centroids(cfg.centroids))
    parts = _collective_check(ctx, lambda: find_parts(cfg.data, cfg.loss.labels_used))
    resume = ctx.broadcast_object(ckpt.find_latest(root) if ctx.is_main else None)
    state = ckpt.read_state(resume) if resume else {}
    # DeepSpeed reloads its own state only onto the same world size and ZeRO stage
    exact = bool(resume) and (state.get("world_size"), state.get("zero_stage")) == (
        ctx.world_size, cfg.deepspeed.zero_stage)

    model_cfg = dataclasses.replace(
        cfg.model, grad_checkpointing=cfg.model.grad_checkpointing or cfg.deepspeed.activation_checkpointing)
    torch.manual_seed(run.seed)  # identical backbone init on every rank
    model = build_model(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if resume and not exact:
        log.warning("resuming a %s-rank ZeRO-%s checkpoint on %d ranks with ZeRO-%d: centers re-sharded, "
                    "backbone weights from the fp32 consolidation, backbone optimizer moments restart",
                    state.get("world_size"), state.get("zero_stage"), ctx.world_size, cfg.deepspeed.zero_stage)
        model.load_state_dict(ckpt.load_backbone_state_dict(resume))
    init = state.get("init_from") if resume else load_initial_weights(model, cfg, num_classes, ctx, out)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_backbone_optimizer(model, cfg.optim,
                                                                                        cfg.finetune),
                                           config=deepspeed_config(cfg), dist_init_required=False)
    if cfg.deepspeed.zero_stage == 3:
        zero3_register_direct_params(engine.module)
    pfc = PartialFC(num_classes, model.out_dim, cfg.partial_fc, cfg.loss, ctx.rank, ctx.world_size,
                    ctx.group, seed=run.seed, grad_scale=float(ctx.world_size)).to(engine.device)
    pfc_opt = make_optimizer(pfc, cfg.partial_fc, cfg.optim.lr, cfg.optim.weight_decay,
                             (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    step, samples_seen = 0, 0
    if not resume:
        load_initial_centers(pfc, cfg)
    if resume:
        if exact:
            engine.load_checkpoint(str(root), tag=resume.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        ckpt.load_centers(resume, pfc, pfc_opt, int(state["world_size"]))
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        log.info("resumed from %s (step %d, %d samples seen)", resume, step, samples_seen)
    global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * ctx.world_size
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:  # drop lines a killed run logged after its last checkpoint
        old = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in old if json.loads(ln)["step"] <= step))
        log.info("training %s (%.1fM params) on %d ranks, K=%d classes (%d per rank), global batch %d, "
                 "ZeRO-%d %s", model_cfg.name, n_params / 1e6,
                 ctx.world_size, num_classes, pfc.num_local, global_batch, cfg.deepspeed.zero_stage,
                 cfg.deepspeed.precision)

    def trainer_state(last: dict) -> dict:
        return {"step": step, "samples_seen": samples_seen, "seed": run.seed, "data_seed": run.seed,
                "rng": "sampling and data are seeded by (seed, rank, step); torch RNG per rank in "
                       "partial_fc/*.safetensors", "world_size": ctx.world_size,
                "zero_stage": cfg.deepspeed.zero_stage, "num_classes": num_classes,
                "global_batch": global_batch, "model_config": dataclasses.asdict(model_cfg.resolved()),
                "config": {"run": to_dict(run), "train": to_dict(cfg)}, "init_from": init,
                "last_metrics": last}

    tracker = Tracker(run.wandb, ctx, str(out), "train", {"train": to_dict(cfg)})
    bar = progress(cfg.steps, "train", ctx, unit="step", initial=step)
    stream = micro_batches(cfg, parts, model_cfg.resolved().image_size, num_classes, run.seed, ctx.rank, step)
    t_start = t_log = time.perf_counter()
    n_log, skipped, last = 0, 0, {}
    saved_at = step
    while step < cfg.steps:
        batches = next(stream)
        try:
            last = train_step(engine, pfc, pfc_opt, batches, step, cfg)
        except TrainingDiverged as e:
            kept = ckpt.find_latest(root)
            raise TrainingDiverged(f"{e}. Last good checkpoint kept: {kept or 'none yet'}") from None
        step += 1
        samples_seen += global_batch
        n_log += global_batch
        skipped += sum(int(b[2]) for b in batches)
        bar.update(1)
        if step % run.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            last.update(samples_per_s=n_log / (now - t_log), skipped_unlabeled=skipped,
                        samples_seen=samples_seen, elapsed_s=now - t_start)
            if torch.cuda.is_available():
                last["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            n_log, t_log = 0, now
            tracker.log(last, step)
            if ctx.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, **last}) + "\n")
                log.info("step %d/%d loss %.4f (pos %.4f neg %.4f) lr %.2e gnorm %.3g %.1f samples/s "
                         "sampled %d pos %d", step, cfg.steps, last["loss"], last["loss_pos"],
                         last["loss_neg"], last["lr"], last["grad_norm"], last["samples_per_s"],
                         last["sampled_classes"], last["positives"])
        over = torch.tensor(float(cfg.time_budget_s > 0 and time.perf_counter() - t_start > cfg.time_budget_s))
        ctx.all_reduce_(over, op=dist.ReduceOp.MAX)
        if step % cfg.checkpoint.every == 0 or step == cfg.steps or over.item():
            ckpt.save(root, step, engine, pfc, pfc_opt, trainer_state(last), ctx, cfg.checkpoint.keep)
            saved_at = step
        if over.item():
            log.warning("time budget %.0f s reached at step %d of %d; checkpoint saved (rerun to continue)",
                        cfg.time_budget_s, step, cfg.steps)
            break
    bar.close()
    tracker.finish()
    summary = {"step": step, "samples_seen": samples_seen, "checkpoint": str(root / ckpt.tag_for(saved_at)),
               "last": last}
    if ctx.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary


def main(config: str | None, overrides: list[str] | None = None) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    run, cfg = load_config(config, overrides or [], "train", TrainConfig)
    _one_process_env()
    ctx = init_distributed()
    setup_logging(ctx)
    return train(run, cfg, ctx)


def cli(argv=None):
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK, which we read)
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    return cli_main(main, argv)


if __name__ == "__main__":
    cli()
