"""A CI-sized demo through the same code path as `make demo` (configs/debug.yaml:
a few hundred real images, a tiny 2D-RoPE ViT, a few dozen steps on 2 torchrun ranks)."""
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT

# the demo run also logs to wandb offline (read back from its files) and evaluates during training
WANDB = ["run.wandb.mode=offline", "train.eval_every=10", "train.eval_max_images=40"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from launch import demo
    out = tmp_path_factory.mktemp("demo")
    saved = {k: os.environ.get(k) for k in ("WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_DIR=str(out / "wandb_dir"), WANDB_SILENT="true")  # stage subprocesses inherit it
    (out / "wandb_dir").mkdir()
    t0 = time.perf_counter()
    try:
        rc = demo.main(["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={out}", *WANDB])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, rc, time.perf_counter() - t0


def wandb_records(path: Path):
    """The records of a wandb offline run file (`run-<id>.wandb`): wandb's transaction log, the
    LevelDB log layout (a 7-byte ':W&B' header, 32 KiB blocks of crc/length/type-framed chunks)
    holding protobuf `Record`s (wandb.proto.wandb_internal_pb2), read here without wandb's sync."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a wandb transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.mark.slow
def test_demo_wandb_offline_run_has_one_group_namespaced_keys_and_eval_series(demo_run):
    out, rc, _ = demo_run
    assert rc == 0
    runs = {}
    for f in sorted((out / "wandb_dir").rglob("*.wandb")):
        recs = list(wandb_records(f))
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        hist = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for r in recs if r.WhichOneof("record_type") == "history"]
        runs[run.job_type] = (run, hist)
    assert {"embed", "cluster", "assign", "train", "eval"} <= set(runs), sorted(runs)
    assert len({run.run_group for run, _ in runs.values()}) == 1 and runs["train"][0].run_group
    train = runs["train"][1]
    keys = {k for h in train for k in h if not k.startswith("_")}
    assert {"train/loss", "train/lr", "data/data_wait_share", "sys/samples_per_s_per_device"} <= keys, keys
    assert all(k.split("/")[0] in ("train", "data", "sys", "eval") for k in keys), keys
    evals = [(h["_step"], h["eval/openclipart/knn_top1"]) for h in train if "eval/openclipart/knn_top1" in h]
    assert [s for s, _ in evals] == [10, 20] and all(0 <= v <= 1 for _, v in evals), evals
    # the same series in metrics.jsonl and in the report (table + plot, stamped with the run)
    metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["eval/openclipart/knn_top1"]) for m in metrics if "eval/fmnist/knn_top1" in m] == evals
    report = (out / "report.md").read_text()
    assert "## Accuracy during training" in report and "| 20 |" in report.split("## Accuracy during training")[1]
    from launch.report import read_stamp
    src = report.split("Source run: `")[1].split("`")[0]
    assert read_stamp(out / "eval_curve.png") == read_stamp(out / "loss_curve.png") == src


@pytest.mark.slow
def test_demo_end_to_end_artifacts(demo_run):
    out, rc, _ = demo_run
    assert rc == 0
    state = json.loads((out / "demo_state.json").read_text())
    assert [s for s in state["stages"]] == ["data", "embed", "cluster", "assign", "train", "export", "eval"]
    assert all(s["done"] for s in state["stages"].values())
    # every stage's artifacts exist and parse
    data = json.loads((out / "data" / "manifest.json").read_text())
    store = json.loads((out / "store" / "manifest.json").read_text())
    assert store["complete"] and store["num_rows"] == data["train"]["samples"]
    centroids = np.load(out / "clusters" / "centroids.npy")
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-4)
    labels = np.load(out / "clusters" / "labels" / "labels_0.npy")
    assert labels.dtype == np.int32 and labels.shape[1] == 8 and labels.max() < centroids.shape[0]
    metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {(r["model"], r["dataset"]) for r in results["results"]} == {
        (m, d) for m in ("trained", "random_init", "stage1_encoder") for d in ("openclipart", "fmnist")}
    report = (out / "report.md").read_text()
    assert "## Linear probe" in report and "| trained |" in report
    for png in ("loss_curve.png", "probe.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    sheets = list((out / "clusters" / "report").glob("*.png"))
    assert len(sheets) >= 2 and (out / "clusters" / "report" / "index.html").is_file()


@pytest.mark.slow
def test_demo_export_reloads_with_matching_features(demo_run):
    """The HF folder, read back by transformers, gives our trained model's features."""
    from transformers import AutoModel

    from training.export import load_training_checkpoint
    from training.model import build_model
    out, rc, _ = demo_run
    assert rc == 0
    sd, cfg, state = load_training_checkpoint(out / "train")
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    hf = AutoModel.from_pretrained(out / "export").eval()
    x = torch.randn(2, 3, cfg.resolved().image_size, cfg.resolved().image_size)
    with torch.no_grad():
        a = ours.vision_model(x).pooler_output
        b = hf(pixel_values=x).pooler_output
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.slow
def test_demo_rerun_resumes_instead_of_redoing(demo_run):
    from launch import demo
    out, rc, _ = demo_run
    assert rc == 0
    before = (out / "demo_state.json").read_text()
    ckpts = sorted(p.name for p in (out / "train" / "checkpoints").iterdir())
    assert demo.main(["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={out}"]) == 0
    # a re-run stage would have rewritten its timing and the training run its checkpoints
    assert (out / "demo_state.json").read_text() == before
    assert sorted(p.name for p in (out / "train" / "checkpoints").iterdir()) == ckpts


@pytest.mark.slow
def test_trained_beats_random_init(tmp_path):
    """A fixed small budget (configs/ci_probe.yaml: ~1.8k real images, K = 64, 300 steps of a
    4-layer 2D-RoPE ViT on 2 ranks): the MLCD-trained encoder beats the same architecture at
    random init on held-out Fashion-MNIST (mean of linear-probe and k-NN gains).

    Measured over run.seed 0-3 (which also re-draws the data) on the Intel box with 400/300 probe
    images: Fashion-MNIST gains (linear, k-NN) +9.0/+1.7, +1.0/+11.3, +2.0/+9.7, +9.7/+15.0
    points, means 5.4-12.4. On the AMD EPYC box (2026-12-02) the same 300 test images gave seed 0
    only +0.7/+2.7 (mean 1.7: a red run), seeds 1-2 means 4.5 and 4.35: the probe's own noise (1
    test image = 0.33 points). With 1,000/1,000 probe images (configs/ci_probe.yaml now) seeds 0-2
    gave +5.1/+7.2, +1.5/+7.3, +3.7/+12.1, means 4.4-7.9 -> threshold 2. The openclipart probe is
    within noise at this budget (means -3.8 to +1.9), so it is reported, not asserted."""
    from launch import demo
    assert demo.main(["--config", str(ROOT / "configs/ci_probe.yaml"), f"run.out_dir={tmp_path}"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    acc = {(r["model"], r["dataset"], p): 100 * r[p]["top1"] for r in res for p in ("linear", "knn")}
    gains = {(d, p): acc[("trained", d, p)] - acc[("random_init", d, p)]
             for d in ("openclipart", "fmnist") for p in ("linear", "knn")}
    print("trained - random_init (points):", {k: round(v, 1) for k, v in gains.items()})
    assert np.mean([gains[("fmnist", "linear")], gains[("fmnist", "knn")]]) >= 2.0, gains


@pytest.mark.slow
def test_demo_cut_short_by_its_time_budget_says_so_and_continues(demo_run):
    """Training stopped by train.time_budget_s is not "done": the report says how many of the
    planned steps ran, export/eval describe that checkpoint, and a rerun continues training."""
    from launch import demo
    out, rc, _ = demo_run
    assert rc == 0
    first = json.loads((out / "demo_state.json").read_text())["stages"]["train"]
    assert first["done"] and first["steps_done"] == first["steps_planned"]
    more = ["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={out}", f"train.steps={first['steps_planned'] + 400}",
            "train.extend_schedule=true", "train.time_budget_s=0.5"]
    assert demo.main([*more, "--only", "train"]) == 0  # resumes, stops at its budget: not done
    cut = json.loads((out / "demo_state.json").read_text())["stages"]["train"]
    assert not cut["done"] and first["steps_done"] < cut["steps_done"] < cut["steps_planned"]
    assert demo.main(more) == 0  # the rerun continues training, then redoes export and eval
    state = json.loads((out / "demo_state.json").read_text())["stages"]
    tr = state["train"]
    assert not tr["done"] and cut["steps_done"] < tr["steps_done"] < tr["steps_planned"]
    assert state["export"]["train_step"] == state["eval"]["train_step"] == tr["steps_done"]
    report = (out / "report.md").read_text()
    assert f"Stopped early: {tr['steps_done']} of {tr['steps_planned']} planned steps" in report
