"""What may change when a run is continued: the data stream does not depend on checkpointing,
resumable keys are declared on the config fields, train.steps changes only with
train.extend_schedule (lr continuous), and named stage instances (`cluster@regions:`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import ROOT

from pipeline.core.config import (
    RESUMABLE,
    ConfigError,
    RunConfig,
    load_config,
    prepare_out_dir,
    resumable_keys,
)
from training.config import OptimConfig, TrainConfig, check_resume_schedule
from training.trainer import lr_at, micro_batches


def _stream(syn, start: int, steps: int, extra: list[str]) -> list[list]:
    """The micro-batch groups the trainer consumes from `start` on (training/trainer.py)."""
    from test_train import synthetic_overrides

    from training.data import find_parts
    over = [*synthetic_overrides(syn), "train.data.batch_size=4", "train.data.workers=0",
            "train.data.shuffle_buffer=8", "train.loss.num_labels=3", "train.deepspeed.grad_accum=2", *extra]
    run, cfg = load_config(None, over, "train", TrainConfig)
    parts = find_parts(cfg.data, 3)
    it = micro_batches(cfg, parts, 16, 24, run.seed, 0, start)
    return [next(it) for _ in range(steps - start)]


def test_stream_ignores_checkpoint_cadence_and_budget(tmp_path):
    """A run resumed at step 7 with another checkpoint interval, keep, time budget and pinning
    gets exactly the batches the uninterrupted run got (the old default epoch was every x
    grad_accum micro-batches, so `every` reordered the data). 2 shards x 39 rows / 4 = 20
    micro-batches per epoch: steps 7..13 cross the epoch boundary at micro-batch 20."""
    from test_train import build_synthetic

    from training.data import TrainDataConfig, epoch_length, find_parts
    build_synthetic(tmp_path, shards=2, per_shard=40)
    parts = find_parts(TrainDataConfig(shards=str(tmp_path / "data/train"), store=str(tmp_path / "store"),
                                       labels=str(tmp_path / "clusters/labels"), batch_size=4), 3)
    assert epoch_length(TrainDataConfig(batch_size=4), parts) == 20  # ceil(78 / 4), from the headers
    full = _stream(tmp_path, 0, 14, ["train.checkpoint.every=2", "train.checkpoint.keep=2"])
    resumed = _stream(tmp_path, 7, 14, ["train.checkpoint.every=7", "train.checkpoint.keep=0",
                                        "train.time_budget_s=100", "train.data.pin_memory=false"])
    assert len(resumed) == 7
    for a, b in zip(full[7:], resumed):
        assert len(a) == len(b) == 2
        for ba, bb in zip(a, b):
            assert torch.equal(ba.images, bb.images) and torch.equal(ba.labels, bb.labels) and ba.keys == bb.keys
    # and the stream is not constant: epoch 1 starts with other samples than epoch 0
    assert not torch.equal(full[0][0].images, full[10][0].images)


def test_resumable_keys_come_from_field_metadata(tmp_path):
    keys = resumable_keys({"run": RunConfig(), "train": TrainConfig()})
    for k in ("run.wandb", "run.log_every", "run.out_dir", "train.checkpoint", "train.time_budget_s",
              "train.data.workers", "train.data.pin_memory", "train.steps", "train.init_from"):
        assert k in keys
    for k in ("train.data.epoch_batches", "train.optim.lr", "train.data.batch_size", "run.seed"):
        assert k not in keys  # these change what is learned

    @dataclass
    class Toy:
        workers: int = field(default=2, metadata=RESUMABLE)
        batch_size: int = 8

    run = RunConfig(out_dir=str(tmp_path))
    prepare_out_dir(tmp_path, run, {"run": run, "toy": Toy()}, "toy")
    prepare_out_dir(tmp_path, run, {"run": run, "toy": Toy(workers=9)}, "toy")  # declared resumable
    with pytest.raises(ConfigError, match=r"toy.batch_size: 8 -> 9"):
        prepare_out_dir(tmp_path, run, {"run": run, "toy": Toy(batch_size=9)}, "toy")


def test_no_stage_keeps_its_own_resumable_list():
    """Every stage reads the resumable keys from the fields: no `ignore=(...)` lists remain
    beyond train.regions (unused when regions are off, so only known at run time)."""
    hits = [(p.name, line.strip()) for p in [*ROOT.glob("pipeline/*.py"), *ROOT.glob("clustering/*.py"),
                                             *ROOT.glob("training/**/*.py")]
            for line in p.read_text().splitlines() if "ignore=" in line and "RESUMABLE" not in line]
    hits = [h for h in hits if h[0] != "config.py" or "prepare_out_dir" in h[1]]  # its own definition
    assert hits and all(name == "train.py" and "train.regions" in line for name, line in hits), hits


def _state(steps: int, step: int, optim: OptimConfig) -> dict:
    from dataclasses import asdict
    return {"step": step, "config": {"train": {"steps": steps, "optim": asdict(optim)}}}


def test_extend_schedule_keeps_lr_continuous():
    old = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cfg = TrainConfig(steps=200, optim=OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
    with pytest.raises(ConfigError, match=r"train.steps=200: ck \(step 60\) was trained for train.steps=100.*"
                                          r"train.extend_schedule=true"):
        check_resume_schedule(cfg, _state(100, 60, old), "ck")
    cfg.extend_schedule = True
    cfg.optim.decay_from = check_resume_schedule(cfg, _state(100, 60, old), "ck")
    assert cfg.optim.decay_from[0] == 60
    assert lr_at(60, cfg.optim, 200) == pytest.approx(lr_at(60, old, 100), abs=1e-12)  # continuous
    lrs = [lr_at(s, cfg.optim, 200) for s in range(60, 201)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    assert lrs[70] > lr_at(130, old, 100)  # stretched: decays slower than the old schedule would
    # a second extension continues from the first one's phase, again without a jump
    again = TrainConfig(steps=400, extend_schedule=True, optim=OptimConfig(lr=1.0, warmup_steps=10,
                                                                          min_lr_ratio=0.1))
    again.optim.decay_from = check_resume_schedule(again, _state(200, 150, cfg.optim), "ck")
    assert lr_at(150, again.optim, 400) == pytest.approx(lr_at(150, cfg.optim, 200), abs=1e-12)
    # same steps: the checkpoint's schedule is kept; during warmup nothing needs anchoring
    assert check_resume_schedule(again, _state(400, 300, again.optim), "ck") == again.optim.decay_from
    assert check_resume_schedule(cfg, _state(100, 5, old), "ck") == []


def test_named_instances_layer_override_and_interpolate(tmp_path):
    from clustering.assign import AssignConfig
    from clustering.kmeans import KMeansConfig
    p = tmp_path / "run.yaml"
    p.write_text("run: {out_dir: /r}\n"
                 "cluster: {k: 64, niter: 7, store: '${run.out_dir}/store', out_dir: '${run.out_dir}/c'}\n"
                 "cluster@regions: {k: 96, store: '${run.out_dir}/regions', out_dir: '${run.out_dir}/c_r'}\n"
                 "assign: {centroids: '${cluster@regions.out_dir}/centroids.npy'}\n")
    _, plain = load_config(p, [], "cluster", KMeansConfig)
    _, reg = load_config(p, [], "cluster", KMeansConfig, instance="regions")
    assert (plain.k, plain.store, plain.out_dir) == (64, "/r/store", "/r/c")
    assert (reg.k, reg.niter, reg.store, reg.out_dir) == (96, 7, "/r/regions", "/r/c_r")  # niter inherited
    # plain overrides go to the plain layer (the instance's own k still wins), @ overrides to the instance
    _, reg = load_config(p, ["cluster.k=5", "cluster.niter=3", "cluster@regions.k=8"], "cluster",
                         KMeansConfig, instance="regions")
    assert (reg.k, reg.niter) == (8, 3)
    _, plain = load_config(p, ["cluster@regions.k=8"], "cluster", KMeansConfig)
    assert plain.k == 64
    _, new = load_config(p, ["cluster@cli.k=9"], "cluster", KMeansConfig, instance="cli")  # CLI-only layer
    assert (new.k, new.store) == (9, "/r/store")
    _, a = load_config(p, ["cluster@regions.out_dir=/x"], "assign", AssignConfig)
    assert a.centroids == "/x/centroids.npy"  # interpolation into an instance sees its override
    with pytest.raises(ConfigError, match="cluster@regions.*cluster.k"):
        load_config(p, ["cluster@regions.k=many"], "cluster", KMeansConfig, instance="regions")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(p, ["cluster@regions.bogus=1"], "cluster", KMeansConfig, instance="regions")


def test_rice_demo_yaml_holds_both_levels():
    """configs/rice_demo.yaml: image-level stage 2 in `cluster:`/`assign:`, region level in their
    `@regions` instances; `mlcd check` validates the instances as their stages load them."""
    from launch.check import check_file
    s = check_file(ROOT / "configs/rice_demo.yaml", ["run.out_dir=/r"])
    assert (s["cluster"].store, s["cluster"].out_dir, s["cluster"].k) == ("/r/store", "/r/clusters", 64)
    reg = s["cluster@regions"]
    assert (reg.store, reg.out_dir, reg.k, reg.niter) == ("/r/regions/store", "/r/regions/clusters", 96, 20)
    assert s["assign"].centroids == "/r/clusters/centroids.npy" == s["train"].centroids
    assert s["assign"].out_dir == s["train"].data.labels == "/r/clusters/labels"
    ra = s["assign@regions"]
    assert (ra.store, ra.centroids, ra.out_dir) == (
        "/r/regions/store", "/r/regions/clusters/centroids.npy", "/r/regions/clusters/labels")
    assert s["region_labels"].labels == ra.out_dir and s["region_labels"].centroids == ra.centroids
