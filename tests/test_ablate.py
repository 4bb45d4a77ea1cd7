"""The ablation runner's grid, skip-on-rerun, report arithmetic and config checks (no training:
the stages it calls are tested in their own files; `mlcd ablate --quick` is the end-to-end run)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "ablation.yaml")


def test_grid_one_factor_at_a_time():
    from launch.ablate import AblateConfig, grid
    cfg = AblateConfig()
    cells = grid(cfg, 1000)
    base = cells[0]
    assert (base.l, base.rho, base.k, base.loss, base.negatives) == (8, 0.1, 1000, "mlcd", "sampled")
    keys = [(c.l, c.rho, c.k, c.loss, c.negatives) for c in cells]
    assert len(set(keys)) == len(keys) == 10  # base + 2 l + 2 rho + 2 K + mlc + batch + unicom
    for c in cells[1:]:
        changed = {f for f in ("l", "rho", "k", "loss", "negatives") if getattr(c, f) != getattr(base, f)}
        assert changed == ({"l", "loss"} if c.factor == "unicom" else {c.factor}), (c, changed)
    assert sorted(c.k for c in cells if c.factor == "k") == [100, 5000]
    quick = grid(cfg, 256, quick=True)
    assert sorted((c.l, c.rho) for c in quick) == [(1, 0.1), (1, 1.0), (8, 0.1), (8, 1.0)]
    assert {c.k for c in quick} == {256} and len({c.name for c in quick}) == 4


def test_rerun_skips_finished_cells(tmp_path, caplog):
    from launch.ablate import Ablation
    ab = Ablation(CONFIG, [f"run.out_dir={tmp_path}"], quick=True, dry_run=True)
    assert ab.seeds == [0, 1, 2] and len(ab.cells) == 4 and ab.base_k == 256 and ab.l_max == 8
    done = ab.cell_dir(ab.cells[1], 2)
    done.mkdir(parents=True)
    (done / "cell.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="mlcd.ablate"):
        ab.run_cell(ab.cells[1], 2)
        ab.run_cell(ab.cells[1], 1)
    text = caplog.text
    assert f"cell {ab.cells[1].name} seed 2: done, skipping" in text
    trains = [m for m in caplog.messages if m.startswith("+ ") and " train " in m]
    assert len(trains) == 1 and "run.seed=1" in trains[0] and "train.loss.num_labels=" in trains[0]
    assert f"train.out_dir={ab.cell_dir(ab.cells[1], 1)}/train" in trains[0]
    # the quick overrides come first, the caller's last (they win)
    assert ab.overrides[0] == "run.out_dir=runs/ablation_quick" and ab.overrides[-1] == f"run.out_dir={tmp_path}"


def test_report_mean_std_and_paper_column(tmp_path):
    from launch.ablate import AblateConfig, grid, paper_value, plot, report
    cells = grid(AblateConfig(), 1000)
    lin = {0: 0.50, 1: 0.54, 2: 0.58}  # mean 54.0, sample std 4.0
    for s, v in lin.items():
        d = tmp_path / "cells" / cells[0].name / f"s{s}"
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"results": {"fmnist": {"linear": v, "knn": 0.3}}}))
    d = tmp_path / "cells" / cells[1].name / "s0"  # l = 1, one seed so far
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"results": {"fmnist": {"linear": 0.4, "knn": 0.2}}}))
    text = report(tmp_path, cells, [0, 1, 2], quick=False)
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 3 | 54.0 +- 4.0 | 30.0 +- 0.0 | 75.2 |" in rows[cells[0].name]
    assert "| 1 | 40.0 +- nan | 20.0 +- nan | 71.4 |" in rows[cells[1].name]
    assert rows[cells[2].name].endswith("| 0 | - | - | 68.7 |")  # l = 32: not run yet
    paper = {c.name: line.split(" | ")[-1].rstrip(" |") for c in cells for line in [rows[c.name]]}
    assert [paper[c.name] for c in cells] == ["75.2", "71.4", "68.7", "73.4", "63.2", "66.9", "74.7",
                                              "76.9 (mlcd 78.1)", "-", "-"]
    ref = tmp_path / "cells" / "random_init"
    ref.mkdir(parents=True)
    (ref / "cell.json").write_text(json.dumps({"random_init": {"fmnist": {"linear": 0.3, "knn": 0.1}},
                                               "stage1_encoder": {"fmnist": {"linear": 0.7, "knn": 0.6}}}))
    text = report(tmp_path, cells, [0, 1, 2], quick=False)
    assert "| reference | random init | 1 | 30.0 | 10.0 | - |" in text
    assert "| reference | stage1 encoder | 1 | 70.0 | 60.0 | - |" in text
    plot(tmp_path, cells, [0, 1, 2])
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quick = grid(AblateConfig(), 256, quick=True)
    assert [paper_value(c, quick[0]) for c in quick] == ["75.2", "71.4", "-", "63.2"]  # l1 rho1: two knobs


def test_bad_ablate_config_is_one_line():
    from launch.ablate import Ablation
    from pipeline.core.config import ConfigError
    with pytest.raises(ConfigError, match=r"ablate\.sample_rates=\[0\.1, 2\.0\]: must be in \(0, 1\]"):
        Ablation(CONFIG, ["ablate.sample_rates=[0.1, 2.0]"], quick=False, dry_run=True)


def test_fmnist_pool_is_disjoint_from_the_probe():
    from pipeline.demo.demo_data import DataConfig, fmnist_items
    cfg = DataConfig(fmnist_train=300, fmnist_pool=500)
    probe = {it["url"] for it in fmnist_items(cfg, "train", cfg.fmnist_train, 0)}
    pool = {it["url"] for it in fmnist_items(cfg, "train", cfg.fmnist_pool, 0, skip=cfg.fmnist_train)}
    assert len(probe) == 300 and len(pool) == 500 and not probe & pool


def test_compare_grid_and_report(tmp_path):
    """configs/compare.yaml: MLCD (base), UNICOM, CLIP + MLCD and CLIP at 2x steps; the report's
    means, the MLCD - CLIP gaps per budget, per-seed random init rows and the compute columns."""
    from launch.ablate import AblateConfig, Ablation, grid
    from launch.compare import compare_report, step_flops
    cfg = AblateConfig(compare=True, budget_factors=[2], rho=1.0)
    cells = grid(cfg, 256, steps=150)
    assert [(c.loss, c.steps) for c in cells] == [("mlcd", 0), ("unicom", 0), ("clip", 0), ("mlcd", 300), ("clip", 300)]
    clip2 = cells[4]
    assert "train.objective=clip" in clip2.train_overrides() and "train.steps=300" in clip2.train_overrides()
    assert "train.objective=clip" not in cells[0].train_overrides()
    # the CLIP cell keeps the base cell's stream settings (same images, same order)
    assert [o for o in cells[2].train_overrides() if "objective" not in o] == cells[0].train_overrides()
    ab = Ablation(str(ROOT / "configs" / "compare.yaml"), [f"run.out_dir={tmp_path}"], quick=False, dry_run=True)
    assert [c.name for c in ab.cells] == [c.name for c in grid(ab.cfg, ab.base_k, steps=ab.train_cfg.steps)]
    f_mlcd, f_clip = (step_flops(c, ab.train_cfg, 2) for c in ab.cells[::2][:2])
    assert f_clip > f_mlcd > 0  # the text tower costs FLOPs the class centers do not
    acc = {cells[0].name: [0.50, 0.54, 0.58], cells[2].name: [0.40, 0.42, 0.44],
           cells[3].name: [0.60, 0.60, 0.60], cells[4].name: [0.50]}
    for name, vals in acc.items():
        for s, v in enumerate(vals):
            d = tmp_path / "cells" / name / f"s{s}"
            d.mkdir(parents=True)
            (d / "cell.json").write_text(json.dumps({"results": {"fmnist": {"linear": v, "knn": v / 2}},
                                                     "s_per_step": 0.5 + s, "flops_per_step": 2e9,
                                                     "train_seconds": 100.0}))
    ref = tmp_path / "cells" / "random_init"
    ref.mkdir(parents=True)
    (ref / "cell.json").write_text(json.dumps({"random_init_s0": {"fmnist": {"linear": 0.2, "knn": 0.1}},
                                               "random_init_s1": {"fmnist": {"linear": 0.3, "knn": 0.1}},
                                               "stage1_encoder": {"fmnist": {"linear": 0.7, "knn": 0.6}}}))
    text = compare_report(tmp_path, cells, [0, 1, 2], base_steps=150)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert rows[1].startswith("| MLCD | 150 | 3 | 54.0 +- 4.0 | 27.0 +- 2.0 | 1.5 +- 1.0 | 2.0 | 100.0 +- 0.0 |")
    assert rows[2].startswith("| UNICOM | 150 | 0 | - | - |")
    assert rows[3].startswith("| CLIP | 150 | 3 | 42.0 +- 2.0 |")
    assert "| random init | 0 | 2 | 25.0 +- 7.1 | 10.0 +- 0.0 |" in text
    assert "| stage1 encoder | 0 | 1 | 70.0 | 60.0 |" in text
    assert "- steps 150: fmnist linear +12.0, fmnist knn +6.0" in text
    assert "- steps 300: fmnist linear +10.0, fmnist knn +5.0" in text
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
