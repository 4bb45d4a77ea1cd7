"""RICE training (train.regions): the masked region loss, the Trainer with a region head and a
second PartialFC, checkpoints (exact and re-sharded resume) and the export's region head files.

Run as a script under torchrun (1 or 2 gloo ranks):
- `loss`: the sharded loss with a row validity mask (padding regions) equals the loss written out
  row by row in float64 (tests/test_partial_fc.py's reference, averaged over the valid rows),
  loss and gradients, both negative rules, mlcd / mlc / unicom, rows with 0-3 labels, all -1
  rows, rows mixing cluster ids and token ids (K + t), no valid row at all (loss 0, no NaN).
- `train2 ROOT` (2 ranks): the Trainer with train.regions on seeded synthetic region batches
  (real DeepSpeed, real checkpoints): ZeRO-2 for 4 steps (checkpoints at 2 and 4); a second run
  resumes the step-2 checkpoint exactly; ZeRO-3 with regions for 2 steps.
- `one ROOT` (1 rank): resumes the 2-rank ZeRO-2 step-4 checkpoint: both center sets re-sharded
  exactly, the region head from the fp32 consolidation, then trains on.
The pytest side checks the files: metrics, centers, the export (HF folder + region head files).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import torchrun

K_CLUSTERS, V_TOKENS = 7, 6  # region label space: cluster ids [0, K), token ids K + t


def region_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 global rows (4 per rank on 2 ranks), labels of width 3 in the K + V label space."""
    K = K_CLUSTERS
    labels = torch.tensor([
        [0, 3, 5],            # object: 3 cluster ids
        [2, -1, -1],          # object: 1 cluster id
        [K + 1, K + 4, -1],   # OCR: 2 token ids
        [-1, -1, -1],         # valid region without a usable label
        [1, K + 0, K + 5],    # cluster and token ids mixed
        [4, 6, 2],            # padding: labels must be ignored
        [K + 2, -1, -1],      # OCR: 1 token id
        [-1, -1, -1],         # padding
    ])
    valid = torch.tensor([True, True, True, True, True, False, True, False])
    emb = torch.randn(8, 8, generator=torch.Generator().manual_seed(11))
    return emb, labels, valid


def check_masked_loss(ctx) -> None:
    from test_partial_fc import compare_dense

    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    n = K_CLUSTERS + V_TOKENS
    emb, labels, valid = region_batch()
    losses = (LossConfig(num_labels=3), LossConfig(mode="mlc", num_labels=3, scale=16),
              LossConfig(mode="unicom", scale=32, margin=0.5))
    for cfg in losses:
        for rule in ("sampled", "batch"):
            for rho, chunk, step in ((1.0, -1, 0), (0.35, -1, 0), (0.35, 2, 5), (0.5, 3, 9)):
                pfc_cfg = PartialFCConfig(sample_rate=rho, negatives=rule, chunk_rows=chunk)
                compare_dense(ctx, n, emb, labels, cfg, pfc_cfg, step=step, valid=valid)
                # no valid row: loss exactly 0, zero gradients, no NaN
                t = compare_dense(ctx, n, emb, labels, cfg, pfc_cfg, step=step, valid=torch.zeros(8, dtype=torch.bool))
                assert float(t["valid_rows"]) == 0 and all(torch.isfinite(v) for v in t.values())
    # every row valid == no mask (the image path), up to the order of the sum
    B = 8 // ctx.world_size
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    for rule in ("sampled", "batch"):
        pfc = PartialFC(n, 8, PartialFCConfig(sample_rate=0.35, negatives=rule), losses[0], ctx.rank,
                        ctx.world_size, ctx, seed=3)
        a, ta = pfc(emb[mine], labels[mine], 4)
        b, tb = pfc(emb[mine], labels[mine], 4, valid=torch.ones(B, dtype=torch.bool))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert all(abs(float(ta[k]) - float(tb[k])) < 1e-5 for k in ta)


# ---------------------------------------------------------------- the Trainer with regions

TINY_MODEL = dict(name="vit_tiny_rope2d", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                  mlp_dim=64, embed_dim=16)
K_IMAGE, B, R, L, GAS = 10, 4, 3, 3, 2
N_REGION = K_CLUSTERS + V_TOKENS


def region_train_cfg(zero: int, steps: int):
    from training.config import (
        CheckpointConfig,
        DeepSpeedConfig,
        OptimConfig,
        RegionTrainConfig,
        TrainConfig,
    )
    from training.data import TrainDataConfig
    from training.loss import LossConfig
    from training.model import ModelConfig
    from training.partial_fc import PartialFCConfig
    return TrainConfig(
        model=ModelConfig(**TINY_MODEL), loss=LossConfig(num_labels=2), steps=steps,
        partial_fc=PartialFCConfig(sample_rate=0.5), optim=OptimConfig(lr=3e-3, warmup_steps=1),
        deepspeed=DeepSpeedConfig(zero_stage=zero, precision="fp32", grad_accum=GAS),
        data=TrainDataConfig(batch_size=B), checkpoint=CheckpointConfig(every=2, keep=0),
        regions=RegionTrainConfig(enabled=True, per_image=R, num_labels=L, weight=0.5,
                                  partial_fc=PartialFCConfig(sample_rate=0.3)))


def fake_batch(step: int, micro: int, rank: int):
    """A seeded micro-batch as the region loader makes it (a Batch with the region fields);
    image 0 has no valid region, labels mix -1, clusters, tokens."""
    from training.data import Batch
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    images = torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.randint(0, K_IMAGE, (B, 2), generator=g)
    xy = torch.randint(0, 24, (B, R, 2), generator=g).float()
    boxes = torch.cat([xy, (xy + torch.randint(2, 14, (B, R, 2), generator=g)).clamp_max(32)], -1)
    rlab = torch.randint(-1, N_REGION, (B, R, L), generator=g)
    valid = torch.rand(B, R, generator=g) < 0.7
    valid[0] = False
    return Batch(images, labels, 0, boxes, rlab, valid)


def fake_stream(trainer, rank: int):
    step = trainer.step
    while True:
        yield [fake_batch(step, m, rank) for m in range(GAS)]
        step += 1


def test_heads_loss_checkpoint_and_a_third_head(tmp_path):
    """training/heads.py in one process: the registered heads, the weighted sum of their losses,
    the zero gradient of an output no head reads, each head's shards saved and loaded in its
    folder, and a third head (with its own parameters) joining the same calls unchanged."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from pipeline.core.dist import DistContext
    from training.heads import Head, configured_heads, forward_kwargs, model_for, model_outputs, total_loss
    cfg, ctx = region_train_cfg(2, 4), DistContext()

    class Pull(Head):  # a toy third term: image embeddings towards a learned vector
        name, folder, output, weight = "pull", "pull_fc", "image", 0.25

        def build(self, dim, ctx, seed, device, optim):
            self.target = torch.ones(dim, requires_grad=True)
            self.opt = torch.optim.SGD([self.target], lr=0.5)

        def loss(self, outputs, batch, micro):
            v = (outputs["image"] - self.target).pow(2).mean()
            return v, {"pull_loss": v.detach()}

        def save(self, step_dir):
            (step_dir / self.folder).mkdir(parents=True)
            save_file({"target": self.target.detach()}, str(step_dir / self.folder / "target.safetensors"))

        def load(self, step_dir, world_size):
            with torch.no_grad():
                self.target.copy_(load_file(step_dir / self.folder / "target.safetensors")["target"])

    def build(cfg, extra=()):
        heads = [*configured_heads(cfg, K_IMAGE, N_REGION), *extra]
        torch.manual_seed(0)
        model = model_for(heads, cfg.model)
        for i, h in enumerate(heads):
            h.build(model.out_dim, ctx, i, "cpu", cfg.optim)
        return heads, model

    def run(heads, model, batch):
        out = model_outputs(model, model(batch.images, **forward_kwargs(heads, batch, "cpu", torch.float32)))
        return out, *total_loss(heads, out, batch, 0)

    heads, model = build(cfg, [Pull()])
    assert [(h.name, h.folder, h.output) for h in heads] == [
        ("image", "partial_fc", "image"), ("region", "region_fc", "region"), ("pull", "pull_fc", "image")]
    assert type(model).__name__ == "MLCDRegionEncoder"
    batch = fake_batch(0, 0, 0)
    out, loss, terms = run(heads, model, batch)
    assert out["image"].shape == (B, 16) and out["region"].shape == (B * R, 16)
    want = terms["image_loss"] + 0.5 * terms["region_loss"] + 0.25 * terms["pull_loss"]
    assert abs(loss.item() - float(want)) < 1e-5 and float(terms["region_loss"]) > 0
    assert int(terms["regions_valid"]) == int(batch.region_valid.sum()) > 0
    loss.backward()
    for h in heads:
        h.finish_step(None, skip=False)
    assert float((heads[2].target.detach() - 1).abs().max()) > 0  # the third head's optimizer stepped
    step = tmp_path / "step_00000001"
    for h in heads:
        h.save(step)
    assert sorted(p.name for p in step.iterdir()) == ["partial_fc", "pull_fc", "region_fc"]
    again, _ = build(dataclasses.replace(cfg, partial_fc=dataclasses.replace(cfg.partial_fc, init_std=0.5)),
                     [Pull()])
    assert not torch.equal(again[0].pfc.weight, heads[0].pfc.weight)
    for h in again:
        h.load(step, 1)
    assert torch.equal(again[0].pfc.weight, heads[0].pfc.weight)
    assert torch.equal(again[1].pfc.weight, heads[1].pfc.weight) and torch.equal(again[2].target, heads[2].target)
    # region loss alone: the image head is kept (checkpointed) but out of the loss, and the image
    # output still gets a gradient (zero), as DeepSpeed expects one for every parameter
    alone = dataclasses.replace(cfg, regions=dataclasses.replace(cfg.regions, image_loss=False))
    heads, model = build(alone)
    assert [h.in_loss for h in heads] == [False, True]
    _, loss, terms = run(heads, model, batch)
    assert "image_loss" not in terms and abs(loss.item() - 0.5 * float(terms["region_loss"])) < 1e-6
    loss.backward()
    assert model.head.weight.grad is not None and not model.head.weight.grad.any()
    assert model.region_head.proj.weight.grad.abs().max() > 0


def region_trainer(ctx, root: Path, zero: int, steps: int, **changes):
    import dataclasses

    from pipeline.core.config import RunConfig
    from training.trainer import CheckpointManager, Trainer
    cfg = dataclasses.replace(region_train_cfg(zero, steps), **changes)
    manager = CheckpointManager(root / "checkpoints", cfg.checkpoint, ctx, zero)
    return Trainer(RunConfig(seed=0, log_every=1), cfg, ctx, K_IMAGE, checkpoints=manager, out_dir=root,
                   region_classes=N_REGION)


def train2(ctx, root: Path) -> None:
    import dataclasses
    a = region_trainer(ctx, root / "a", 2, 4)
    assert [h.name for h in a.heads] == ["image", "region"] and all(h.in_loss for h in a.heads)
    assert type(a.engine.module).__name__ == "MLCDRegionEncoder"
    a.fit(fake_stream(a, ctx.rank))
    if ctx.is_main:  # b starts from a's step-2 checkpoint only
        shutil.copytree(root / "a" / "checkpoints" / "step_00000002", root / "b" / "checkpoints" / "step_00000002")
    ctx.barrier()
    b = region_trainer(ctx, root / "b", 2, 4)
    assert b.step == 2 and b.checkpoints.exact
    b.fit(fake_stream(b, ctx.rank))
    # ZeRO-3, region loss alone (the image head gets a zero gradient)
    rcfg = dataclasses.replace(region_train_cfg(3, 2).regions, image_loss=False)
    z3 = region_trainer(ctx, root / "z3", 3, 2, regions=rcfg)
    z3.fit(fake_stream(z3, ctx.rank))


def one(ctx, root: Path) -> None:
    """1 rank continues a's 2-rank step-4 checkpoint (re-sharded)."""
    from safetensors.torch import load_file

    from training.checkpoint import load_backbone_state_dict
    step4 = root / "one" / "checkpoints" / "step_00000004"
    shutil.copytree(root / "a" / "checkpoints" / "step_00000004", step4)
    t = region_trainer(ctx, root / "one", 2, 5)
    assert t.step == 4 and not t.checkpoints.exact
    for folder, head in (("partial_fc", t.head("image")), ("region_fc", t.head("region"))):
        pfc, opt = head.pfc, head.opt
        assert head.folder == folder
        saved = [load_file(step4 / folder / f"rank{r}_of2.safetensors") for r in range(2)]
        assert torch.equal(pfc.weight.detach(), torch.cat([x["weight"] for x in saved]))
        assert torch.equal(opt.state[pfc.weight]["exp_avg"], torch.cat([x["opt.exp_avg"] for x in saved]))
    sd = load_backbone_state_dict(step4)
    mine = t.engine.module.state_dict()
    assert any(k.startswith("region_head.") for k in sd)
    assert all(torch.equal(mine[k].float(), v) for k, v in sd.items())
    out = t.fit(fake_stream(t, ctx.rank))
    assert out["step"] == 5 and np.isfinite(out["last"]["region_loss"])
    # init_from a RICE checkpoint: the backbone is taken, the region head starts fresh (seeded);
    # a plain (regions off) run takes the backbone too (region_head.* left out)
    from training.config import RegionTrainConfig
    from training.regions import MLCDRegionEncoder, RegionHeadConfig
    torch.manual_seed(0)
    fresh = MLCDRegionEncoder(region_train_cfg(2, 1).model, RegionHeadConfig(layers=1)).state_dict()
    for name, regions in (("init", None), ("init_plain", RegionTrainConfig())):
        extra = {"regions": regions} if regions is not None else {}
        t = region_trainer(ctx, root / name, 2, 1, init_from=str(step4), **extra)
        got = t.engine.module.state_dict()
        assert t.step == 0 and all(torch.equal(got[k].float(), v) for k, v in sd.items()
                                   if not k.startswith("region_head."))
        heads = [k for k in got if k.startswith("region_head.")]
        if regions is None:  # RICE: the region head is the fresh seeded one, not the checkpoint's
            assert heads and all(torch.equal(got[k], fresh[k]) for k in heads)
            assert any(not torch.equal(got[k].float(), sd[k]) for k in heads)
        else:  # plain: an MLCDEncoder, no region head at all
            assert heads == [] and [h.name for h in t.heads] == ["image"]


@pytest.fixture(scope="module")
def region_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rice_train")
    torchrun(["tests/test_rice_train.py", "train2", str(root)], 2, timeout=500)
    torchrun(["tests/test_rice_train.py", "one", str(root)], 1, timeout=300)
    return root


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_region_training_resumes_exactly(region_runs):
    from safetensors.torch import load_file
    a, b = metrics(region_runs / "a"), metrics(region_runs / "b")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    for s in (1, 2, 3, 4):
        m = a[s]
        assert np.isfinite([m["loss"], m["image_loss"], m["region_loss"]]).all()
        assert abs(m["loss"] - (m["image_loss"] + 0.5 * m["region_loss"])) < 1e-4
        assert 0 < m["regions_valid"] < GAS * 2 * B * R  # padding rows are not counted
        assert m["region_negatives"] > 0 and m["region_sampled_classes"] > 0
    for s in (3, 4):
        for k in ("loss", "region_loss", "image_loss", "regions_valid"):
            assert abs(a[s][k] - b[s][k]) <= 1e-5 * max(1.0, abs(a[s][k])), (s, k, a[s][k], b[s][k])
    for folder in ("partial_fc", "region_fc"):
        for r in range(2):
            wa, wb = (load_file(region_runs / x / "checkpoints" / "step_00000004" / folder / f"rank{r}_of2.safetensors")
                      for x in ("a", "b"))
            torch.testing.assert_close(wa["weight"], wb["weight"], rtol=1e-5, atol=1e-6)
    w2, w4 = (load_file(region_runs / "a" / "checkpoints" / f"step_0000000{s}" / "region_fc" / "rank0_of2.safetensors")
              for s in (2, 4))
    assert float((w4["weight"] - w2["weight"]).abs().max()) > 1e-5  # the region centers train
    state = json.loads((region_runs / "a" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["region_classes"] == N_REGION and state["region_head"] == {"layers": 1}


@pytest.mark.slow
def test_region_training_zero3_and_one_rank(region_runs):
    a, z3 = metrics(region_runs / "a"), metrics(region_runs / "z3")
    assert sorted(z3) == [1, 2]
    # same seeded init and data: ZeRO-3's first region loss is ZeRO-2's; image loss off
    assert abs(z3[1]["region_loss"] - a[1]["region_loss"]) <= 2e-3 * abs(a[1]["region_loss"])
    assert "image_loss" not in z3[1] and abs(z3[1]["loss"] - 0.5 * z3[1]["region_loss"]) < 1e-5
    assert np.isfinite(z3[2]["region_loss"]) and z3[2]["grad_norm"] > 0
    one = metrics(region_runs / "one")
    assert 5 in one and np.isfinite(one[5]["region_loss"])
    assert (region_runs / "one" / "checkpoints" / "step_00000005" / "region_fc" / "rank0_of1.safetensors").is_file()


@pytest.mark.slow
def test_region_export(region_runs, tmp_path):
    """The backbone exports to a HF folder transformers loads (same pooler output as ours), the
    region head beside it (same weights, loadable into a RegionHead of region_head.json)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from training.export import export, load_training_checkpoint
    from training.regions import MLCDRegionEncoder, RegionHead, RegionHeadConfig
    out = export(region_runs / "a", tmp_path / "hf")
    plain, _, _ = load_training_checkpoint(region_runs / "a")  # eval / init_from: no region head
    sd, cfg, state = load_training_checkpoint(region_runs / "a", region_head=True)
    assert set(sd) - set(plain) == {k for k in sd if k.startswith("region_head.")} != set()
    from training.model import build_model
    build_model(cfg).load_state_dict(plain)  # strict: what eval's checkpoint kind builds
    ours = MLCDRegionEncoder(cfg, RegionHeadConfig(layers=1)).eval()
    ours.load_state_dict(sd)
    hf = AutoModel.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "MLCDVisionModel"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, ours.vision_model(x).pooler_output,
                                   rtol=1e-5, atol=1e-5)
    assert not any("region" in k for k in load_file(out / "model.safetensors"))
    conf = json.loads((out / "region_head.json").read_text())
    assert conf["layers"] == 1 and conf["width"] == 32 and conf["region_classes"] == N_REGION
    head = RegionHead(**{k: conf[k] for k in ("width", "heads", "mlp_dim", "layers", "embed_dim", "act", "eps")})
    w = load_file(out / "region_head.safetensors")
    head.load_state_dict(w)  # strict: every key, every shape
    for k, v in w.items():
        assert torch.equal(v, sd[f"region_head.{k}"])


# ---------------------------------------------------------------- config and input checks

def build_region_store(root: Path, store: Path, k: int = K_CLUSTERS, v: int = V_TOKENS) -> None:
    """A tiny region store + region labels + label_space.json in the RICE layout, for the image
    store at `store` (0-3 regions per image; object rows: cluster ids, OCR rows: K + token ids,
    some rows without a label)."""
    import pyarrow.parquet as pq

    from pipeline.core.store import meta_path, write_labels, write_part
    rng = np.random.default_rng(0)
    part = 0
    while meta_path(store, part).is_file():
        keys = pq.read_table(meta_path(store, part)).column("key").to_pylist()
        rows, labs = [], []
        for key in keys:
            for j in range(int(rng.integers(0, 4))):
                x0, y0 = (int(t) for t in rng.integers(0, 16, 2))
                ocr = j == 2
                rows.append({"key": f"{key}.r{j}", "image_key": key, "x0": x0, "y0": y0, "x1": x0 + 8,
                             "y1": y0 + 6, "img_w": 24, "img_h": 24, "kind": "ocr" if ocr else "object",
                             "text": "cat" if ocr else "", "source": "test"})
                lab = [k + int(t) for t in rng.choice(v, 2, replace=False)] if ocr else list(rng.choice(k, 2, replace=False))
                labs.append([-1, -1, -1, -1] if rng.random() < 0.1 else [*lab, -1, -1])
        emb = rng.normal(size=(len(rows), 4)).astype(np.float32)
        write_part(root / "store", part, {"img": emb / np.linalg.norm(emb, axis=1, keepdims=True)},
                   pa.Table.from_pylist(rows))
        lab = np.asarray(labs, np.int64).reshape(-1, 4)
        write_labels(root / "labels", part, lab, np.ones_like(lab, dtype=np.float16))
        part += 1
    (root / "labels" / "label_space.json").write_text(json.dumps(
        {"clusters": k, "tokens": v, "num_classes": k + v, "tokenizer": "test", "width": 4}))


def test_region_config_and_input_checks(tmp_path):
    from test_train import build_synthetic

    from pipeline.core.config import ConfigError, load_config
    from pipeline.core.dist import DistContext
    from training.config import RegionTrainConfig, TrainConfig
    from training.validate import TrainInputError, check_inputs, region_num_classes
    with pytest.raises(ConfigError, match="per_image"):
        RegionTrainConfig(per_image=0)
    with pytest.raises(ConfigError, match="weight"):
        RegionTrainConfig(image_loss=False, weight=0.0)
    syn = tmp_path / "syn"
    build_synthetic(syn)
    build_region_store(tmp_path / "regions", syn / "store")
    over = [f"train.data.shards={syn}/data/train", f"train.data.store={syn}/store",
            f"train.data.labels={syn}/clusters/labels", f"train.centroids={syn}/clusters/centroids.npy",
            "train.loss.num_labels=3", "train.regions.enabled=true",
            f"train.regions.store={tmp_path}/regions/store", f"train.regions.labels={tmp_path}/regions/labels",
            "train.regions.num_labels=4"]
    _, cfg = load_config(None, over, "train", TrainConfig)
    assert cfg.regions.enabled and cfg.regions.partial_fc.sample_rate == 0.1
    assert cfg.regions.partial_fc.negatives == "sampled"
    check_inputs(cfg, DistContext())
    assert region_num_classes(cfg.regions) == N_REGION
    with pytest.raises(ConfigError, match="regions.partial_fc.sample_rate"):
        load_config(None, over + ["train.regions.partial_fc.sample_rate=0"], "train", TrainConfig)
    # each missing / unfit input: one line naming it
    _, bad = load_config(None, over[:-1] + ["train.regions.num_labels=5"], "train", TrainConfig)
    with pytest.raises(TrainInputError, match="labels_0.npy: has 4 labels per row, train.regions.num_labels needs 5"):
        check_inputs(bad, DistContext())
    _, bad = load_config(None, over + [f"train.regions.store={tmp_path}/nowhere"], "train", TrainConfig)
    with pytest.raises(TrainInputError, match="nowhere: region store not found"):
        check_inputs(bad, DistContext())
    space = tmp_path / "regions" / "labels" / "label_space.json"
    space.write_text(json.dumps({"clusters": 7, "tokens": 6, "num_classes": 10}))
    with pytest.raises(TrainInputError, match=r"label .* is outside \[-1, 10\)"):
        check_inputs(cfg, DistContext())
    space.unlink()
    with pytest.raises(TrainInputError, match="label_space.json: region label space not found"):
        check_inputs(cfg, DistContext())
    _, off = load_config(None, over[:-4], "train", TrainConfig)  # regions off: nothing of theirs is read
    check_inputs(off, DistContext())


@pytest.mark.slow
def test_region_training_stage(tmp_path):
    """The stage end to end on files (2 ranks, ZeRO-2): inputs checked, the region loader feeds
    the Trainer, both center sets checkpointed; a rerun with more steps resumes."""
    from test_train import TINY, build_synthetic, synthetic_overrides
    syn = tmp_path / "syn"
    build_synthetic(syn)
    build_region_store(tmp_path / "regions", syn / "store")
    over = ["-m", "training.train", f"run.out_dir={tmp_path / 'run'}", *TINY, *synthetic_overrides(syn),
            "train.deepspeed.zero_stage=2", "train.steps=4", "train.regions.enabled=true",
            f"train.regions.store={tmp_path}/regions/store", f"train.regions.labels={tmp_path}/regions/labels",
            "train.regions.per_image=2", "train.regions.num_labels=2", "train.regions.partial_fc.sample_rate=0.3"]
    p = torchrun(over, 2, timeout=300)
    assert "13 region classes (7 per rank)" in p.stdout + p.stderr
    m = metrics(tmp_path / "run" / "train")
    assert sorted(m) == [1, 2, 3, 4]
    assert all(np.isfinite(m[s]["region_loss"]) and 0 < m[s]["regions_valid"] <= 2 * 8 * 2 for s in m)
    step4 = tmp_path / "run" / "train" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in (step4 / "region_fc").iterdir()) == ["rank0_of2.safetensors", "rank1_of2.safetensors"]
    p = torchrun([x if x != "train.steps=4" else "train.steps=6" for x in over] + ["train.extend_schedule=true"], 2,
                 timeout=300)
    assert f"resumed from {step4}" in p.stdout + p.stderr
    assert sorted(metrics(tmp_path / "run" / "train")) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_masked_loss_matches_dense_reference(ranks):
    p = torchrun(["tests/test_rice_train.py", "loss"], ranks, timeout=240)
    assert all(f"RICE_LOSS_OK {r}" in p.stdout for r in range(ranks)), p.stdout[-2000:]


if __name__ == "__main__":  # worker: python tests/test_rice_train.py WHAT [ARGS] under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline.core.dist import destroy, init_distributed
    ctx = init_distributed()
    if sys.argv[1] == "loss":
        check_masked_loss(ctx)
        print(f"RICE_LOSS_OK {ctx.rank}", flush=True)
    else:
        from pipeline.core.tracking import setup_logging
        setup_logging(ctx)
        {"train2": train2, "one": one}[sys.argv[1]](ctx, Path(sys.argv[2]))
    # torn down before exit: a gloo group left to the interpreter's exit aborted a rank once
    # ("terminate called without an active exception", SIGABRT after both ranks had passed)
    destroy(ctx)
