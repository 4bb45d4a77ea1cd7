"""wandb that survives requeues: the run id is kept in the job's folder and reused (offline mode,
no network), group/tags reach the run, tables log."""
from __future__ import annotations

import pytest

from pipeline.config import WandbConfig
from pipeline.dist import DistContext
from pipeline.tracking import Tracker

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
