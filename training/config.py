"""Stage 3's configuration (the ``train`` section): small typed configs validated on
construction. The public keys are those of ``configs/defaults/train.yaml``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config import RESUMABLE, ConfigError, check
from training.data import TrainDataConfig
from training.evaluation.evaluate import DatasetSpec, KnnConfig, _spec
from training.init_weights import FinetuneConfig
from training.loss import LossConfig
from training.model import ModelConfig
from training.partial_fc import PartialFCConfig


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
    # [step, phase]: from `step` on the cosine runs from `phase` (0..1) to 1 at train.steps. Set
    # when a run is resumed with train.extend_schedule (schedule_phase), not by hand.
    decay_from: list[float] = field(default_factory=list, metadata=RESUMABLE)

    def __post_init__(self):
        check(self.name in ("adamw", "sgd"), "name", self.name, "must be adamw or sgd")
        check(len(self.decay_from) in (0, 2) and all(math.isfinite(x) for x in self.decay_from),
              "decay_from", self.decay_from, "must be [] or [step, phase] (set by train.extend_schedule)")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.beta1 >= 0 and self.beta2 >= 0 and self.eps > 0, "beta1/beta2/eps",
              (self.beta1, self.beta2, self.eps), "betas must be >= 0 and eps > 0")
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
    # (train.checkpoint is resumable: the data stream's epochs do not depend on it, data.py)

    def __post_init__(self):
        check(self.every >= 1, "every", self.every, "must be >= 1")
        check(self.keep >= 0, "keep", self.keep, "must be >= 0 (0 = keep all)")


@dataclass
class RegionTrainConfig:
    """RICE (train.regions): region cluster discrimination beside the image loss. Every region of
    a step's images gets its own embedding from the Region Transformer head (training/regions.py)
    and its own classes (region clusters K + OCR tokens V, `{labels}/label_space.json`), through a
    second PartialFC. Cost: the head (~1/L of the backbone per layer) and a B x R row loss."""
    enabled: bool = False
    store: str = "${run.out_dir}/regions/store"     # region store (stage 1b): boxes per image
    labels: str = "${run.out_dir}/regions/labels"   # region labels + label_space.json
    per_image: int = 8            # R: regions per image per step (random subset / padding), so
    #                               every rank's region batch is B x R rows
    layers: int = 1               # Region Transformer layers
    weight: float = 1.0           # total loss = image loss + weight x region loss
    image_loss: bool = True       # false: the region loss alone trains the backbone
    num_labels: int = 8           # label width used per region (top-l clusters / OCR tokens)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)  # the region classes' own
    #                               centers (num_classes 0 = label_space.json's num_classes)

    def __post_init__(self):
        check(self.per_image >= 1, "per_image", self.per_image, "must be >= 1")
        check(self.layers >= 1, "layers", self.layers, "must be >= 1")
        check(self.weight >= 0, "weight", self.weight, "must be >= 0")
        check(self.num_labels >= 1, "num_labels", self.num_labels, "must be >= 1")
        check(self.image_loss or self.weight > 0, "weight", self.weight,
              "must be > 0 when image_loss is false (nothing would be trained)")


@dataclass
class ClipConfig:
    """train.clip: the CLIP baseline's text tower (train.objective=clip, training/clip_head.py)."""
    width: int = 128              # text transformer width
    layers: int = 2
    heads: int = 4
    context_length: int = 32      # tokens per caption (BOS + BPE + EOS, truncated)
    vocab_size: int = 49408       # open_clip's SimpleTokenizer vocabulary

    def __post_init__(self):
        check(self.width >= 8 and self.width % self.heads == 0, "width", self.width,
              "must be >= 8 and divisible by heads")
        check(self.layers >= 1, "layers", self.layers, "must be >= 1")
        check(self.heads >= 1, "heads", self.heads, "must be >= 1")
        check(self.context_length >= 4, "context_length", self.context_length, "must be >= 4")


@dataclass
class TrainConfig:
    out_dir: str = field(default="${run.out_dir}/train", metadata=RESUMABLE)
    centroids: str = "${run.out_dir}/clusters/centroids.npy"  # K when partial_fc.num_classes = 0
    # optimizer steps (the LR schedule's length). On resume a different value is refused unless
    # extend_schedule=true: then the remaining cosine decay is stretched (or squeezed) from the
    # resume step to the new end, so the lr is continuous there (check_resume_schedule).
    steps: int = field(default=1000, metadata=RESUMABLE)
    extend_schedule: bool = field(default=False, metadata=RESUMABLE)
    time_budget_s: float = field(default=0.0, metadata=RESUMABLE)  # stop early with a checkpoint
    #                               after this long (0 = no limit)
    # MFU in the metrics: achieved model FLOP/s per device over this peak (TFLOP/s, dense, the
    # training precision); 0 = the datasheet bf16 peak for known GPUs (A100, H100, H200), none on CPU
    peak_tflops: float = field(default=0.0, metadata=RESUMABLE)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=RESUMABLE)
    # A new run's starting weights (training/init_weights.py); a checkpoint in out_dir wins (so
    # both are read only before the first checkpoint, and may change on resume).
    init_from: str = field(default="", metadata=RESUMABLE)  # run/step folder of ours, HF folder,
    #                               or state file; "" = random init
    init_centers_from: str = field(default="", metadata=RESUMABLE)  # run/step folder of ours with
    #                               the same K; "" = fresh centers
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    regions: RegionTrainConfig = field(default_factory=RegionTrainConfig)  # RICE, off by default
    # Evaluation during training (training/eval_hook.py): every eval_every steps (and at the last
    # step) k-NN top-1 of the backbone being trained on each of eval_sets (name/train/test: the
    # labeled sets `mlcd eval` reads), logged as eval/<set>/knn_top1 to wandb and metrics.jsonl.
    # 0 = off. None of it changes the trained weights (RNG and data order are left as they were).
    eval_every: int = field(default=0, metadata=RESUMABLE)
    eval_sets: list[DatasetSpec] = field(default_factory=list, metadata=RESUMABLE)
    eval_max_images: int = field(default=400, metadata=RESUMABLE)  # rows per split (evenly spaced);
    #                               cost ~ 2 x this many forwards per set, on all ranks together
    eval_linear: bool = field(default=False, metadata=RESUMABLE)  # also the linear probe (eval/<set>/
    #                               linear_top1; ~7 L-BFGS fits, rank 0)
    eval_knn: KnnConfig = field(default_factory=KnnConfig, metadata=RESUMABLE)
    # mlcd: cluster discrimination (train.loss); clip: the image-text contrastive baseline on the
    # shards' captions (training/clip_head.py; the image head is built but not in the loss)
    objective: str = "mlcd"
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self):
        check(self.objective in ("mlcd", "clip"), "objective", self.objective, "must be mlcd or clip")
        check(self.objective == "mlcd" or not self.regions.enabled, "objective", self.objective,
              "clip does not combine with train.regions.enabled")
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check("://" not in self.out_dir, "out_dir", self.out_dir,
              "DeepSpeed checkpoints need a POSIX path (local or shared filesystem), not a URL")
        check(self.time_budget_s >= 0, "time_budget_s", self.time_budget_s, "must be >= 0")
        self.eval_sets = [_spec(DatasetSpec, v, f"eval_sets.{i}") for i, v in enumerate(self.eval_sets)]
        names = [d.name for d in self.eval_sets]
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0 (0 = off)")
        check(not self.eval_every or bool(names), "eval_sets", names, "must name a set when eval_every > 0")
        check(all(n and "/" not in n for n in names) and len(set(names)) == len(names), "eval_sets", names,
              "names must be unique, non-empty and without '/' (they name wandb keys)")
        check(all(d.train and d.test for d in self.eval_sets), "eval_sets", names, "each needs train and test")
        check(self.eval_max_images >= 2, "eval_max_images", self.eval_max_images, "must be >= 2")
        check(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0 (0 = the device's datasheet)")


def schedule_phase(step: int, optim: OptimConfig, total: int) -> float:
    """Cosine phase in [0, 1] after warmup: (step - warmup) / (total - warmup), or, from
    ``optim.decay_from = [s0, t0]`` on, t0 + (1 - t0) (step - s0) / (total - s0)."""
    if optim.decay_from and step >= optim.decay_from[0]:
        s0, t0 = int(optim.decay_from[0]), float(optim.decay_from[1])
        return min(1.0, t0 + (1 - t0) * (step - s0) / max(1, total - s0))
    return min(1.0, max(0.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)))


def check_resume_schedule(cfg: TrainConfig, state: dict, where: str) -> list[float]:
    """``optim.decay_from`` for a run resumed from a checkpoint whose trainer_state is ``state``.
    The same train.steps keeps the checkpoint's schedule; another one is refused (one line)
    unless train.extend_schedule: then the decay continues from the checkpoint's phase."""
    old = state.get("config", {}).get("train", {})
    prev_steps, step = int(old.get("steps", cfg.steps)), int(state.get("step", 0))
    prev = OptimConfig(**{**old.get("optim", {}), "decay_from": old.get("optim", {}).get("decay_from", [])})
    if cfg.steps == prev_steps:
        return list(prev.decay_from)
    if not cfg.extend_schedule:
        raise ConfigError(
            f"train.steps={cfg.steps}: {where} (step {step}) was trained for train.steps={prev_steps}, "
            f"and the lr schedule depends on it; pass train.extend_schedule=true to stretch the rest "
            f"of the cosine decay to step {cfg.steps}, or run.overwrite=true to start over")
    if step < prev.warmup_steps and not prev.decay_from:
        return []  # still warming up: the plain schedule with the new length is continuous
    return [step, schedule_phase(step, prev, prev_steps)]
