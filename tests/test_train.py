"""Stage 3 training: DeepSpeed + PartialFC + MLCD loss under real torchrun/gloo processes.

Each torchrun + DeepSpeed start costs seconds on 2 cores, so runs are shared between checks:
- the `runs` fixture: one 2-rank torchrun calling train() five times (ZeRO 0/1/2/3 on synthetic
  shards + labels, 40 steps on the debug demo shards with category-derived labels);
- a SIGKILLed ZeRO-2 run that resumes and follows the uninterrupted ZeRO-2 trajectory;
- a 1-rank resume of the 2-rank checkpoint (centers re-sharded).
The exactness checks of the sharded loss and of one full step live in tests/test_partial_fc.py.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, free_port, torchrun
from PIL import Image

from pipeline.core.io import atomic_save_npy
from pipeline.core.shards import ShardWriter
from pipeline.core.store import write_labels, write_part

TINY = ["train.model.name=vit_tiny_rope2d", "train.model.image_size=32", "train.model.patch_size=8",
        "train.model.width=32", "train.model.layers=1", "train.model.heads=2", "train.model.mlp_dim=64",
        "train.model.embed_dim=16", "train.deepspeed.precision=fp32", "train.data.batch_size=8",
        "train.data.workers=0", "train.data.shuffle_buffer=16", "train.optim.warmup_steps=2",
        "train.optim.lr=3e-3", "run.log_every=1", "train.loss.num_labels=3"]


def build_synthetic(root: Path, shards: int = 2, per_shard: int = 40, k: int = 24, l: int = 3,
                    seed: int = 0) -> dict:
    """Tiny shards + embedding-store metadata + labels + centroids, stage 1/2 layouts. Class c has
    its own colour; labels [c, c+1, c+5] (mod k). Row 3 of each shard is unlabeled (-1) and one
    sample per shard is missing from the metadata: both must be skipped and counted."""
    rng = np.random.default_rng(seed)
    data, store, labels_dir = root / "data" / "train", root / "store", root / "clusters" / "labels"
    palette = rng.integers(0, 256, size=(k, 3))
    for s in range(shards):
        w = ShardWriter(data, s)
        keys, labs = [], []
        for i in range(per_shard):
            c = int(rng.integers(k))
            img = np.clip(palette[c] + rng.normal(0, 20, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            key = f"{s:05d}{i:04d}"
            w.write(key, buf.getvalue(), "png", f"class {c}", {"url": f"synthetic://{key}"})
            if i == per_shard - 1:
                continue  # in the shard, not in the metadata
            keys.append(key)
            labs.append([-1] * l if i == 3 else [c, (c + 1) % k, (c + 5) % k][:l])
        w.close()
        n = len(keys)
        meta = pa.table({"key": keys, "caption": [""] * n, "url": [""] * n,
                         "shard": [str(data / f"{s:05d}.tar")] * n, "shard_row": list(range(n))})
        write_part(store, s, {"img": rng.normal(size=(n, 4)).astype(np.float32)}, meta)
        lab = np.asarray(labs, dtype=np.int32)
        write_labels(labels_dir, s, lab, np.ones_like(lab, dtype=np.float16))
    atomic_save_npy(root / "clusters" / "centroids.npy", rng.normal(size=(k, 4)).astype(np.float32))
    return {"k": k, "unlabeled_per_shard": 2}


def read_metrics(out: Path) -> dict[int, dict]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def run_train(run_dir: Path, nproc: int, extra: list[str], timeout: int = 300):
    return torchrun(["-m", "training.train", f"run.out_dir={run_dir}", *TINY, *extra], nproc,
                    timeout=timeout)


def demo_labels(data: Path, root: Path) -> list[str]:
    """A store + labels for the debug demo shards: [category, first caption word bucket], so the
    labels carry signal. Returns the train overrides pointing at them."""
    from pipeline.core.shards import expand_shards
    shards = expand_shards(str(data / "train"))
    cats: dict[str, int] = {}
    for i, url in enumerate(shards):
        rows = [r for r in pq.read_table(url[:-4] + ".parquet").to_pylist() if r["status"] == "success"]
        keys = [r["key"] for r in rows]
        lab = np.asarray([[cats.setdefault(r["label"], len(cats)),
                           100 + sum(map(ord, (r["caption"] or "x").split()[0])) % 16] for r in rows], np.int32)
        n = len(keys)
        meta = pa.table({"key": keys, "caption": [""] * n, "url": [""] * n, "shard": [url] * n,
                         "shard_row": list(range(n))})
        write_part(root / "store", i, {"img": np.zeros((n, 4), np.float32)}, meta)
        write_labels(root / "labels", i, lab, np.ones_like(lab, dtype=np.float16))
    atomic_save_npy(root / "centroids.npy", np.zeros((116, 4), np.float32))  # K; required (README)
    return [f"train.data.shards={data / 'train'}", f"train.data.store={root / 'store'}",
            f"train.data.labels={root / 'labels'}", f"train.centroids={root / 'centroids.npy'}",
            "train.partial_fc.num_classes=116", "train.loss.num_labels=2"]


def synthetic_overrides(syn: Path) -> list[str]:
    return [f"train.data.shards={syn}/data/train", f"train.data.store={syn}/store",
            f"train.data.labels={syn}/clusters/labels", f"train.centroids={syn}/clusters/centroids.npy",
            "train.steps=16", "train.checkpoint.every=2", "train.checkpoint.keep=0"]


def test_shard_range_margin_and_dense_loss():
    import math

    import torch

    from training.loss import LossConfig, apply_margin, dense_mlcd_loss
    from training.partial_fc import shard_range
    for k, w in ((11, 2), (10, 3), (7, 7), (1_000_003, 8)):
        blocks = [shard_range(k, r, w) for r in range(w)]
        assert blocks[0][0] == 0 and sum(n for _, n in blocks) == k
        assert all(s + n == blocks[i + 1][0] for i, (s, n) in enumerate(blocks[:-1]))
        assert max(n for _, n in blocks) - min(n for _, n in blocks) <= 1
    c = torch.linspace(-1, 1, 2001, requires_grad=True)
    phi = apply_margin(c, 0.3, "arc")
    phi.sum().backward()
    assert torch.isfinite(c.grad).all() and (phi.diff() > 0).all()  # increasing in c (no fold-back)
    torch.testing.assert_close(apply_margin(c, 0.3, "arc")[1500], torch.cos(torch.arccos(c[1500]) + 0.3))
    torch.testing.assert_close(apply_margin(c, 0.2, "cos"), c - 0.2)
    # MLCD loss against a literal transcription of eq. 5 (rho = 1)
    g = torch.Generator().manual_seed(0)
    emb, centers = torch.randn(4, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.tensor([[0, 3], [5, -1], [8, 8], [2, 1]])
    cfg = LossConfig(num_labels=2, scale=16, margin=0.25)
    loss, _ = dense_mlcd_loss(emb, centers, labels, cfg)
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(centers, dim=1).T
    want = 0.0
    for i, row in enumerate(labels.tolist()):
        pos = {v for v in row if v >= 0}
        want += math.log(1 + sum(math.exp(-16 * math.cos(math.acos(cos[i, p]) + 0.25)) for p in pos))
        want += math.log(1 + sum(math.exp(16 * cos[i, j]) for j in range(9) if j not in pos))
    assert abs(loss.item() - want / 4) < 1e-4


@pytest.mark.parametrize("workers", [0, 2])
def test_data_stream_resumes_mid_epoch(tmp_path, workers):
    """Batches j.. of an epoch started at j equal those of the uninterrupted epoch (any number of
    DataLoader workers); unlabeled samples are skipped and counted; labels are the join by key."""
    import torch

    from training.data import Batch, TrainDataConfig, find_parts, make_loader
    build_synthetic(tmp_path, shards=2, per_shard=20)
    cfg = TrainDataConfig(shards=str(tmp_path / "data" / "train"), store=str(tmp_path / "store"),
                          labels=str(tmp_path / "clusters" / "labels"), batch_size=4, workers=workers,
                          shuffle_buffer=8)
    parts = find_parts(cfg, 3)
    full = list(make_loader(parts, cfg, 16, 3, 24, seed=1, rank=0, epoch=2, num_batches=7))
    part = list(make_loader(parts, cfg, 16, 3, 24, seed=1, rank=0, epoch=2, num_batches=7, start=3))
    assert len(full) == 7 and len(part) == 4
    assert all(type(b) is Batch for b in full + part)  # through the DataLoader (and its workers) as is
    for a, b in zip(full[3:], part):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.keys == b.keys
    assert full[0].images.shape == (4, 3, 16, 16) and full[0].labels.shape == (4, 3)
    assert full[0].boxes is None and full[0].region_labels is None and full[0].region_valid is None
    assert sum(b.skipped for b in full) > 0  # 2 unlabeled per shard pass
    assert ((full[0].labels[:, 1] - full[0].labels[:, 0]) % 24 == 1).all()  # labels [c, c+1, c+5]
    # keys name the samples (shard(5) + row(4)): only labeled ones (not row 3, not the last)
    labeled = {f"{s:05d}{i:04d}" for s in range(2) for i in range(20) if i not in (3, 19)}
    assert all(len(b.keys) == 4 and set(b.keys) <= labeled for b in full)
    assert len({k for b in full for k in b.keys}) > 4
    other = list(make_loader(parts, cfg, 16, 3, 24, seed=1, rank=1, epoch=2, num_batches=1))
    assert not torch.equal(other[0].images, full[0].images)  # ranks draw different streams


def test_to_model_input_normalizes_uint8_on_the_device():
    """uint8 batches are scaled and CLIP-normalized by the trainer (as the float loader path does
    on the host); float batches pass through as they are."""
    import torch

    from training.model import CLIP_MEAN, CLIP_STD
    from training.trainer import to_model_input
    arr = np.random.default_rng(0).integers(0, 256, (2, 3, 12, 10), dtype=np.uint8)
    want = (arr / 255.0 - np.asarray(CLIP_MEAN)[:, None, None]) / np.asarray(CLIP_STD)[:, None, None]
    got = to_model_input(torch.from_numpy(arr), "cpu", torch.float32)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 12, 10)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    half = to_model_input(torch.from_numpy(arr), "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.float().numpy(), want, rtol=1e-2, atol=1e-2)
    x = torch.from_numpy(want.astype(np.float32))
    assert torch.equal(to_model_input(x, "cpu", torch.float32), x)
    assert to_model_input(x, "cpu", torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="pinning needs a CUDA device")
def test_batch_is_pinned_by_the_dataloader():
    """DataLoader(pin_memory=True) passes a dataclass through unpinned unless it has pin_memory()."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from training.data import Batch

    class Two(IterableDataset):
        def __iter__(self):
            for i in range(2):
                yield Batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.full((2, 1), i), 1,
                            region_valid=torch.ones(2, 3, dtype=torch.bool), keys=["a", "b"])
    got = list(DataLoader(Two(), batch_size=None, num_workers=1, pin_memory=True))
    assert [int(b.labels[0, 0]) for b in got] == [0, 1] and all(b.keys == ["a", "b"] for b in got)
    assert all(b.images.is_pinned() and b.labels.is_pinned() and b.region_valid.is_pinned() for b in got)
    assert all(b.boxes is None and b.skipped == 1 for b in got)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    """One torchrun (2 ranks) running train() five times in the same processes (a DeepSpeed start
    costs seconds): ZeRO 0/1/2/3 on synthetic data, and 40 steps on the debug demo shards."""
    root = tmp_path_factory.mktemp("train")
    build_synthetic(root / "syn")
    common = synthetic_overrides(root / "syn")
    spec = {f"z{z}": [f"run.out_dir={root / f'z{z}'}", *TINY, *common, f"train.deepspeed.zero_stage={z}"]
            for z in (0, 1, 2, 3)}
    spec["demo"] = [f"run.out_dir={root / 'demo'}", *TINY, *demo_labels(demo_data[0], root / "demo_labels"),
                    "train.model.image_size=48", "train.steps=40", "train.checkpoint.every=40",
                    "train.optim.warmup_steps=4", "train.data.batch_size=16", "train.partial_fc.sample_rate=0.5"]
    # last: SGD with an absurd LR makes the weights inf after step 1 -> step 2's loss is NaN
    spec["nan"] = [f"run.out_dir={root / 'nan'}", *TINY, *common, "train.optim.name=sgd",
                   "train.optim.lr=1e30", "train.optim.warmup_steps=0", "train.deepspeed.grad_clip=0",
                   "train.steps=4", "train.checkpoint.every=1"]
    (root / "spec.json").write_text(json.dumps(spec))
    torchrun(["tests/test_train.py", str(root / "spec.json")], 2, timeout=400)
    return root


@pytest.mark.slow
def test_zero_stages_match(runs):
    losses = {}
    for stage in (0, 1, 2, 3):
        m = read_metrics(runs / f"z{stage}")
        assert sorted(m) == list(range(1, 17))
        losses[stage] = np.array([m[s]["loss"] for s in range(1, 17)])
        assert np.isfinite(losses[stage]).all()
        assert m[1]["sampled_classes"] > 0 and m[1]["positives"] > 0
    assert sum(read_metrics(runs / "z0")[s]["skipped_unlabeled"] for s in range(1, 17)) > 0
    for stage in (1, 2, 3):
        np.testing.assert_allclose(losses[stage][:5], losses[0][:5], rtol=2e-3, atol=2e-3)
    ck = runs / "z2" / "train" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000016"
    state = json.loads((ck / "step_00000016" / "trainer_state.json").read_text())
    assert state["complete"] and state["step"] == 16 and state["model_config"]["width"] == 32
    assert sorted(p.name for p in (ck / "step_00000016" / "partial_fc").iterdir()) == [
        "rank0_of2.safetensors", "rank1_of2.safetensors"]
    # the export path: ZeRO-3 and ZeRO-0 checkpoints consolidate to the same kind of state dict
    from training.checkpoint import load_backbone_state_dict
    sd3 = load_backbone_state_dict(runs / "z3" / "train" / "checkpoints" / "step_00000016")
    sd0 = load_backbone_state_dict(runs / "z0" / "train" / "checkpoints" / "step_00000016")
    assert sd3.keys() == sd0.keys() and any(k.startswith("vision_model.encoder.layers.0.") for k in sd3)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_checkpoint(runs):
    msg = (runs / "nan_error.txt").read_text()
    assert "loss is nan at step 2" in msg and "Last good checkpoint kept" in msg, msg
    ck = runs / "nan" / "train" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000001"
    assert not (ck / "step_00000002").exists()
    assert sorted(read_metrics(runs / "nan")) == [1]


@pytest.mark.slow
def test_loss_falls_on_demo_data(runs):
    m = read_metrics(runs / "demo")
    loss = np.array([m[s]["loss"] for s in sorted(m)])
    assert len(loss) == 40 and np.isfinite(loss).all()
    assert loss[-5:].mean() < 0.8 * loss[:5].mean(), loss


@pytest.mark.slow
def test_sigkill_resume_reproduces(runs, tmp_path):
    """SIGKILL the whole ZeRO-2 run once a checkpoint at step >= 4 exists, rerun: it resumes there
    and follows the uninterrupted ZeRO-2 trajectory."""
    common = synthetic_overrides(runs / "syn")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--max_restarts=0", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
           "-m", "training.train", f"run.out_dir={out}", *TINY, *common, "train.deepspeed.zero_stage=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "train" / "checkpoints" / "latest"
    t0 = time.time()
    while time.time() - t0 < 240 and p.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000004":
            break
        time.sleep(0.05)
    assert p.poll() is None, "run finished before it could be killed"
    # torchrun starts its workers in their own sessions: SIGKILL each of them and torchrun itself
    procs = psutil.Process(p.pid).children(recursive=True)
    for q in procs:
        q.send_signal(signal.SIGKILL)
    p.send_signal(signal.SIGKILL)
    p.wait()
    psutil.wait_procs(procs, timeout=30)
    killed_at = int(latest.read_text().strip()[5:])
    assert 4 <= killed_at < 16
    r = run_train(out, 2, common + ["train.deepspeed.zero_stage=2"])
    assert f"resumed from {out / 'train' / 'checkpoints' / f'step_{killed_at:08d}'}" in r.stderr + r.stdout
    m, ref = read_metrics(out), read_metrics(runs / "z2")
    assert sorted(m) == list(range(1, 17))  # lines logged after the last checkpoint were dropped
    np.testing.assert_allclose([m[s]["loss"] for s in range(1, 17)], [ref[s]["loss"] for s in range(1, 17)],
                               rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_resume_on_one_rank(runs, tmp_path):
    """One rank continues the 2-rank ZeRO-2 checkpoint: centers re-sharded exactly (checked on
    the file), backbone from the fp32 consolidation, training goes on."""
    import torch
    from safetensors.torch import load_file

    from training.checkpoint import load_centers
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer
    out = tmp_path / "one"
    shutil.copytree(runs / "z2", out)
    step16 = out / "train" / "checkpoints" / "step_00000016"
    saved = [load_file(step16 / "partial_fc" / f"rank{r}_of2.safetensors") for r in range(2)]
    full = {k: torch.cat([s[k] for s in saved]) for k in ("weight", "opt.exp_avg", "opt.exp_avg_sq")}
    # exact re-sharding, in-process: 2 blocks (12 + 12) -> 3 blocks (8 + 8 + 8) and -> 1 block
    for rank, world in ((1, 3), (0, 1)):
        pfc = PartialFC(24, 16, PartialFCConfig(), LossConfig(), rank, world)
        opt = make_optimizer(pfc, PartialFCConfig(), 1e-3, 0.0)
        load_centers(step16, pfc, opt, world_size=2)
        rows = slice(pfc.start, pfc.start + pfc.num_local)
        torch.testing.assert_close(pfc.weight.detach(), full["weight"][rows], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[pfc.weight]["exp_avg_sq"], full["opt.exp_avg_sq"][rows])
        assert float(opt.state[pfc.weight]["step"]) == 16
    more = synthetic_overrides(runs / "syn") + ["train.deepspeed.zero_stage=2", "train.steps=18",
                                                "train.checkpoint.every=100"]
    p = subprocess.run([sys.executable, "-m", "training.train", f"run.out_dir={out}", *TINY, *more], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("config error")]
    assert p.returncode == 2 and len(err) == 1 and "train.extend_schedule=true" in err[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    # the schedule ended at 16 (phase 1): extended, it stays at the (here raised) floor, lr x 0.5
    p = run_train(out, 1, more + ["train.extend_schedule=true", "run.resume=true", "train.optim.min_lr_ratio=0.5"])
    assert "resuming a 2-rank ZeRO-2 checkpoint on 1 ranks" in p.stderr + p.stdout
    m = read_metrics(out)
    assert sorted(m) == list(range(1, 19)) and np.isfinite(m[18]["loss"])
    assert m[17]["lr"] == m[18]["lr"] == pytest.approx(3e-3 * 0.5)
    w = load_file(out / "train" / "checkpoints" / "step_00000018" / "partial_fc" / "rank0_of1.safetensors")
    assert w["weight"].shape == full["weight"].shape and 0 < float((w["weight"] - full["weight"]).abs().max()) < 0.5


if __name__ == "__main__":  # worker: python tests/test_train.py SPEC.json under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.core.config import load_config
    from pipeline.core.dist import init_distributed
    from pipeline.core.tracking import setup_logging
    from training.train import TrainConfig, train
    ctx = init_distributed()
    setup_logging(ctx)
    from training.train import TrainingDiverged
    spec_path = Path(sys.argv[1])
    for name, overrides in json.loads(spec_path.read_text()).items():
        run, cfg = load_config(None, overrides, "train", TrainConfig)
        try:
            train(run, cfg, ctx)
        except TrainingDiverged as e:
            if name != "nan":
                raise
            if ctx.is_main:
                (spec_path.parent / "nan_error.txt").write_text(str(e))
