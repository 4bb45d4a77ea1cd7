"""Stage 3: MLCD pretraining. DeepSpeed ZeRO for the backbone, class-sharded PartialFC for the
K class centers (outside DeepSpeed), the MLCD multi-label loss (or UNICOM's ArcFace softmax).

    torchrun --nproc_per_node 2 -m training.train --config configs/demo.yaml [train.k=v ...]
    deepspeed --num_gpus 8 --module training.train --config ...     (same code path)
    python -m training.train --config ...                           (one process)

Resumable at any step: re-running the same command continues from the newest complete
checkpoint in `train.out_dir/checkpoints` (see training/checkpoint.py); the data stream is a
function of (seed, step) (training/data.py), so a resumed run follows the uninterrupted one.
A non-finite loss stops the run before any optimizer step uses it; the last checkpoint stays.

This module is the stage's entry (inputs checked once, then ``Trainer(...).fit()``); the loop,
the step and the checkpoint manager are in training/trainer.py, the config in training/config.py.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.core.config import RunConfig, prepare_out_dir
from pipeline.core.dist import DistContext, free_port
from pipeline.core.entry import stage_cli, stage_main
from training.checkpoint import find_latest, read_state
from training.config import (  # noqa: F401 -- the `train` section's schema lives here for the registry
    CheckpointConfig,
    DeepSpeedConfig,
    OptimConfig,
    TrainConfig,
    check_resume_schedule,
)
from training.data import num_classes_from_centroids
from training.trainer import (  # noqa: F401 -- re-exported: the stage's public names
    CheckpointManager,
    Trainer,
    TrainingDiverged,
    checked_input,
    deepspeed_config,
    find_train_parts,
    lr_at,
    make_backbone_optimizer,
    train_step,
)
from training.validate import check_inputs, region_num_classes

log = logging.getLogger("mlcd.train")


def _one_process_env() -> None:
    """Before the stage runs: DeepSpeed's accelerator (CPU without a GPU) and, for `python -m
    training.train` without a launcher, the 1-rank process group DeepSpeed needs (only when no
    launcher set the variables)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def train(run: RunConfig, cfg: TrainConfig, ctx: DistContext) -> dict:
    """The stage: check the run folder and inputs once (rank 0; every rank agrees), build the
    Trainer (resuming from the newest complete checkpoint), fit."""
    check_inputs(cfg, ctx)  # training/validate.py: bad inputs end here in one line, on every rank
    out = Path(cfg.out_dir)
    root = out / "checkpoints"

    def prepare() -> list[float]:
        """Rank 0: the resume checks (train.steps vs the checkpoint's schedule), then the folder's
        config (train.* keys that may change on resume are declared on the fields, config.py)."""
        if run.overwrite:  # a fresh start must not auto-resume, nor keep the old metrics
            CheckpointManager.clear(root)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        last = find_latest(root)
        cfg.optim.decay_from = check_resume_schedule(cfg, read_state(last), str(last)) if last else []
        # regions off: nothing of train.regions is used (nor in folders made before it existed)
        prepare_out_dir(out, run, {"run": run, "train": cfg}, "train",
                        ignore=() if cfg.regions.enabled else ("train.regions",))
        return cfg.optim.decay_from
    cfg.optim.decay_from = ctx.agree(prepare)
    num_classes = cfg.partial_fc.num_classes or ctx.agree(
        lambda: checked_input(lambda: num_classes_from_centroids(cfg.centroids)))
    region_classes = ctx.agree(lambda: region_num_classes(cfg.regions)) if cfg.regions.enabled else 0
    parts = ctx.agree(lambda: checked_input(lambda: find_train_parts(cfg, num_classes, region_classes)))
    manager = CheckpointManager(root, cfg.checkpoint, ctx, cfg.deepspeed.zero_stage)
    trainer = Trainer(run, cfg, ctx, num_classes, checkpoints=manager, out_dir=out, region_classes=region_classes)
    if ctx.is_main:
        log.info("training %s (%.1fM params) on %d ranks, global batch %d, ZeRO-%d %s; loss heads: %s",
                 trainer.model_cfg.name, trainer.n_params / 1e6, ctx.world_size, trainer.global_batch,
                 cfg.deepspeed.zero_stage, cfg.deepspeed.precision, "; ".join(h.describe() for h in trainer.heads))
    return trainer.fit(trainer.stream(parts))


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("train", train, config, overrides, instance, setup=_one_process_env)


if __name__ == "__main__":
    stage_cli("train")
