"""Evaluation during training (train.eval_every, training/eval_hook.py): the eval/ keys land in the
records of the due steps (every N and the last), with the accuracy `mlcd eval`'s k-NN gives that
step's checkpoint, and training is not perturbed (the loss stream equals the eval-off run's)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import torchrun
from test_train import TINY, demo_labels

from training.evaluation.features import open_labeled


def _records(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_eval_during_training_logs_at_due_steps_and_leaves_training_alone(tmp_path, demo_data):
    data = demo_data[0]
    common = [*TINY, *demo_labels(data, tmp_path / "labels"), "train.model.image_size=48", "train.steps=7",
              "train.checkpoint.every=100", "run.log_every=2"]
    probe = data / "probe" / "openclipart"
    sets = (f"train.eval_sets=[{{name: clip, train: {probe / 'train'}, test: {probe / 'test'}}},"
            f"{{name: clip2, train: {probe / 'test'}, test: {probe / 'train'}}}]")
    spec = {"off": [f"run.out_dir={tmp_path / 'off'}", *common],
            "on": [f"run.out_dir={tmp_path / 'on'}", *common, "train.eval_every=3", sets,
                   "train.eval_max_images=60", "train.eval_linear=true"]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(["tests/test_train.py", str(tmp_path / "spec.json")], 2, timeout=400)
    off, on = _records(tmp_path / "off"), _records(tmp_path / "on")
    # eval steps are logged even off the log_every grid (3), and at the last step (7)
    evald = sorted(s for s, r in on.items() if "eval/clip/knn_top1" in r)
    assert evald == [3, 6, 7], sorted(on)
    assert not any(k.startswith("eval/") for r in off.values() for k in r)
    for s in evald:
        for key in ("eval/clip/knn_top1", "eval/clip2/knn_top1", "eval/clip/linear_top1"):
            assert 0.0 <= on[s][key] <= 1.0
        assert on[s]["eval/seconds"] > 0
    # training is untouched: every step both runs logged has the same loss, bit for bit
    common_steps = sorted(set(off) & set(on))
    assert common_steps == [2, 4, 6, 7]
    assert [on[s]["loss"] for s in common_steps] == [off[s]["loss"] for s in common_steps]
    assert [on[s]["grad_norm"] for s in common_steps] == [off[s]["grad_norm"] for s in common_steps]
    # the number is the one `mlcd eval`'s k-NN gives the saved step-7 checkpoint on the same rows
    import torch

    from pipeline.core.dist import DistContext
    from training.eval_hook import subsample
    from training.evaluation import probe as probes
    from training.evaluation.evaluate import ModelSpec
    from training.evaluation.features import build_extractor, extract
    ex = build_extractor(ModelSpec(name="m", kind="checkpoint", path=str(tmp_path / "on" / "train")),
                         torch.device("cpu"))
    tr, te = (subsample(open_labeled(str(probe / s)), 60) for s in ("train", "test"))
    assert len(open_labeled(str(probe / "train"))) > len(tr) == 60  # the cap applied
    xtr, xte = (extract(ex, d, DistContext(), 16) for d in (tr, te))
    knn = probes.knn_probe(xtr, tr.labels, xte, te.labels)["top1"]
    assert abs(knn - on[7]["eval/clip/knn_top1"]) <= 1 / len(te) + 1e-9, (knn, on[7])


def test_subsample_is_even_and_deterministic(demo_data):
    from training.eval_hook import subsample
    ds = open_labeled(str(demo_data[0] / "probe" / "openclipart" / "train"))
    a, b = subsample(ds, 20), subsample(ds, 20)
    assert len(a) == 20 and a.items == b.items and a.items[0] == ds.items[0] and a.items[-1] == ds.items[-1]
    assert np.array_equal(a.labels, ds.labels[[ds.items.index(it) for it in a.items]])
    assert subsample(ds, 10**6) is ds


def test_eval_sets_are_checked_before_training():
    from pipeline.core.config import ConfigError
    from training.config import TrainConfig
    with pytest.raises(ConfigError, match="eval_sets"):
        TrainConfig(eval_every=10)
    with pytest.raises(ConfigError, match="eval_sets"):
        TrainConfig(eval_every=10, eval_sets=[{"name": "a/b", "train": "x", "test": "y"}])
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig(eval_sets=[{"name": "a", "train": "x", "test": "y", "tset": "z"}])
