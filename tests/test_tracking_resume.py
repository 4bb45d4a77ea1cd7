"""wandb that survives requeues: the run id is kept in the job's folder and reused (offline mode,
no network), group/tags reach the run, tables log."""
from __future__ import annotations

import pytest

from pipeline.core.config import WandbConfig
from pipeline.core.dist import DistContext
from pipeline.core.tracking import Tracker

pytest.importorskip("wandb")


def test_wandb_id_is_kept_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = WandbConfig(mode="offline", group="l14", tags=["ft336"])
    t = Tracker(cfg, DistContext(), str(tmp_path), "train", {"x": 1})
    first = t.run.id
    assert (tmp_path / "wandb_id.train.txt").read_text().strip() == first
    assert t.run.group == "l14" and list(t.run.tags) == ["ft336"]
    t.log({"loss": 1.0}, step=1)
    t.log_table("eval/results", ["model", "top1"], [["a", 0.5]])
    t.finish()
    t = Tracker(cfg, DistContext(), str(tmp_path), "train", {"x": 1})  # the requeued job
    assert t.run.id == first
    t.finish()
    other = Tracker(cfg, DistContext(), str(tmp_path), "eval", {})  # another job: its own run
    assert other.run.id != first
    other.finish()
    assert Tracker(WandbConfig(), DistContext(), str(tmp_path / "off"), "train", {}).run is None
    assert not (tmp_path / "off").exists()  # disabled (the default) writes nothing


def test_wandb_follows_its_environment_unless_the_config_says(tmp_path, monkeypatch):
    """WANDB_MODE/PROJECT/ENTITY/DIR apply when the config leaves a key unset; a set key wins.
    One group per pipeline run (run.name, else the run folder's name), run names <name>-<stage>."""
    from pipeline.core.config import RunConfig
    from pipeline.core.tracking import wandb_settings
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)
    s = wandb_settings(WandbConfig(), "demo", "embed", "out")
    assert (s["mode"], s["project"], s["name"], s["group"], s["dir"]) == ("disabled", "openmlcd", "demo-embed",
                                                                          "demo", "out")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    s = wandb_settings(WandbConfig(), "demo", "embed", "out")
    assert (s["mode"], s["project"], s["dir"]) == ("offline", "theirs", str(tmp_path / "wb"))
    s = wandb_settings(WandbConfig(mode="disabled", project="ours", group="g"), "demo", "embed", "out")
    assert (s["mode"], s["project"], s["group"]) == ("disabled", "ours", "g")
    run = RunConfig(out_dir=str(tmp_path / "runs" / "exp7"))  # no name: the folder's
    t = Tracker(run, DistContext(), str(tmp_path / "train"), "train", {"run": {"seed": 0}, "train": {"steps": 3}})
    assert t.run is not None and t.run.group == "exp7" and t.run.name == "exp7-train"
    assert t.run.config["train"]["steps"] == 3 and t.run.project == "theirs"
    t.finish()


def test_cluster_report_logs_captioned_sheets_and_histograms(tmp_path, monkeypatch):
    """Images carry captions; histograms go up from raw values and from streamed (counts, edges)."""
    import numpy as np
    from PIL import Image
    monkeypatch.setenv("WANDB_SILENT", "true")
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8), "red").save(png)
    t = Tracker(WandbConfig(mode="offline"), DistContext(), str(tmp_path), "assign", {})
    t.log_image("clusters/sheet_3", str(png), caption="cluster 3: 12 images, mean top-1 similarity 0.812")
    t.log_histogram("clusters/sizes", np.array([0, 3, 12, 5]))
    t.log_histogram("clusters/top1_similarity_hist", np.array([1, 4, 2]), np.array([0.0, 0.5, 0.8, 1.0]))
    summary = dict(t.run.summary)
    t.finish()
    assert summary["clusters/sheet_3"]["caption"] == "cluster 3: 12 images, mean top-1 similarity 0.812"
    assert summary["clusters/top1_similarity_hist"]["_type"] == "histogram"
