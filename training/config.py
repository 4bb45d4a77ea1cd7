"""Stage 3's configuration (the ``train`` section): small typed configs validated on
construction. The public keys are those of ``configs/defaults/train.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import check
from training.data import TrainDataConfig
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
    regions: RegionTrainConfig = field(default_factory=RegionTrainConfig)  # RICE, off by default

    def __post_init__(self):
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.time_budget_s >= 0, "time_budget_s", self.time_budget_s, "must be >= 0")


# Keys that may change when a run is continued (they do not change what is learned; a run folder
# may also be moved or copied).
RESUMABLE_KEYS = ("train.steps", "train.time_budget_s", "train.checkpoint", "train.data.workers",
                  "train.data.pin_memory", "run.out_dir", "train.out_dir",
                  "train.init_from", "train.init_centers_from")  # read only before the first checkpoint
