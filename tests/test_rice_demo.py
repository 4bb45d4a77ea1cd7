"""RICE end to end at CI size through the same code path as `make rice-demo` (launch/rice_demo.py):
real scenes -> image store + labels -> regions (box file + Tesseract) -> stage 2 on the region
store -> region labels -> RICE and plain MLCD trainings (2 torchrun ranks, a few steps) -> HF
exports -> eval-regions of both and random init."""
import json
import shutil

import numpy as np
import pytest

from tests.conftest import ROOT

TINY = ["data.rice.pool_scenes=60", "data.rice.probe_train=40", "data.rice.probe_test=40",
        "cluster@regions.k=8", "assign.l=4", "region_labels.width=4", "region_labels.max_tokens=4",
        "train.steps=4", "train.checkpoint.every=4", "train.optim.warmup_steps=1",
        "train.loss.num_labels=4", "train.regions.num_labels=4", "train.data.batch_size=8",
        "train.model={name: vit_tiny_rope2d, image_size: 64, patch_size: 16, width: 32, layers: 1, "
        "heads: 2, mlp_dim: 64, embed_dim: 16}"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr not installed (make apt)")
def test_rice_demo_end_to_end(tmp_path):
    from launch import rice_demo
    out = tmp_path / "rice"
    rc = rice_demo.main(["--config", str(ROOT / "configs/rice_demo.yaml"), "--image-k=4", f"run.out_dir={out}", *TINY])
    assert rc == 0
    state = json.loads((out / "rice_demo_state.json").read_text())
    assert tuple(state["stages"]) == rice_demo.ORDER and all(s["done"] for s in state["stages"].values())
    stats = json.loads((out / "regions" / "store" / "stats.json").read_text())
    assert stats["complete"] and stats["kept"].get("object", 0) > 0 and stats["kept"].get("ocr", 0) > 0
    space = json.loads((out / "regions" / "labels" / "label_space.json").read_text())
    assert space["num_classes"] == 8 + space["tokens"] and space["tokens"] > 0
    labels = np.concatenate([np.load(p) for p in sorted((out / "regions" / "labels").glob("labels_*.npy"))])
    assert labels.shape[1] == 4 and (labels[:, 0] >= 0).all()  # every kept region has a label
    assert ((labels >= 0) & (labels < 8)).any() and (labels >= 8).any()  # clusters and tokens
    metrics = [json.loads(x) for x in (out / "train_rice" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(m.get("region_loss", np.nan)) for m in metrics)
    assert (out / "export_rice" / "region_head.safetensors").is_file()
    assert not (out / "export_mlcd" / "region_head.safetensors").exists()
    res = json.loads((out / "eval_regions" / "results.json").read_text())["results"]
    assert {(r["model"], r["task"]) for r in res} == {
        (m, t) for m in ("rice", "mlcd_image_only", "random_init") for t in ("object", "word")}
    # RICE's own region embeddings are probed too; the models without region layers have none
    assert {r["model"] for r in res if r["feature"] == "region_head"} == {"rice"}
    assert space["tokens"] == len(space["token_ids"]) < 49408  # compact token space
    report = (out / "report.md").read_text()
    assert "| rice |" in report and "train_rice" in report


def test_seeds_move_the_exports_and_average_the_tables(tmp_path):
    """--seeds: each seed's eval reads its own exports and random init takes its seed; the report
    averages each (model, feature, column) cell over seeds (std with ddof 1)."""
    from launch.rice_demo import RiceDemo
    from launch.rice_seeds import seed_overrides, seeds_table
    demo = RiceDemo(str(ROOT / "configs/rice_seeds.yaml"), [f"run.out_dir={tmp_path}"], 1, None, [3, 4])
    over = seed_overrides(demo, 4)
    assert "run.seed=4" in over and f"eval_regions.out_dir={tmp_path}/seed4/eval_regions" in over
    assert f"eval_regions.models.0.path={tmp_path}/seed4/export_rice" in over
    assert f"eval_regions.models.1.path={tmp_path}/seed4/export_mlcd" in over
    assert "eval_regions.models.2.seed=4" in over

    def res(a, b):
        return {"results": [{"model": "rice", "feature": "region_head", "task": "word",
                             "linear": {"top1": a}, "knn": {"top1": b}},
                            {"model": "mlcd", "feature": "patch_mean", "task": "word", "skipped": "x"}]}
    table = seeds_table({3: res(0.10, 0.2), 4: res(0.30, 0.2)})
    assert "| rice [region_head] | 20.0 ± 14.1 | 20.0 ± 0.0 |" in table
    assert "mlcd" not in table  # a skipped probe has no cell
