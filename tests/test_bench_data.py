"""The training-loader bench (training/bench_data.py) stays runnable: real demo shards through
training/data.py's loader, fast vs reference per core, and the fast path with 1 and 2 workers; and
`loader_rate`, the entry `make gpu-check` calls, runs its CPU variant. No timed assertion: rates
only have to exist; ratios are the rows' own arithmetic."""
import pytest


@pytest.mark.slow
def test_loader_bench_rows():
    from training.bench_data import ANCHORS, bench_loader
    rows = bench_loader(quick=True, model_rate=100.0, model_config="m")
    per_core_row, workers, cores, vs_model = rows
    assert per_core_row["bench"].startswith("train loader images/s per core: fast uint8")
    assert per_core_row["ours"] > 0 and per_core_row["reference"] > 0
    assert per_core_row["ratio"] == pytest.approx(per_core_row["ours"] / per_core_row["reference"])
    assert workers["ours"] > 0 and workers["reference"] > 0
    per_core = float(cores["config"].split()[0].replace(",", ""))
    assert per_core >= per_core_row["ours"] * 0.99
    assert cores["ours"] == pytest.approx(ANCHORS["A100 40% MFU"] / per_core, rel=0.01)
    assert vs_model["reference"] == 100.0 and vs_model["ratio"] == pytest.approx(100.0 / vs_model["ours"])


def test_loader_rate_cpu():
    """gpu-check's call, on the CPU: synthetic shards (JPEG, PNG, grey, EXIF-rotated), the fast
    loader's rate, and its measured pixel difference from the reference path within the bound
    tests/test_decode.py sets."""
    from training.bench_data import BATCH, loader_rate
    r = loader_rate("cpu", "cpu", n=2 * BATCH)
    assert r["decode"] == "cpu" and r["images"] == 2 * BATCH and r["images_per_s"] > 0
    assert 0 < r["pixel_max_abs_diff_vs_reference"] <= 128
    assert r["pixel_mean_abs_diff_vs_reference"] <= 0.3
    assert "pixel_max_abs_diff_vs_cpu" not in r


def test_fast_path_costs_parts(tmp_path):
    """The fast path's parts per image exist and are positive (their sizes are the README's)."""
    from training.bench_data import fast_path_costs, synthetic_data
    spec, _, _ = synthetic_data(tmp_path, 12)
    costs = fast_path_costs(spec, rounds=1)
    assert set(costs) == {"tar read", "header + plan", "decode_jpeg", "resize into the batch",
                          "a new batch, first touch", "decode_batch_cpu (all but tar)"}
    assert all(v > 0 for v in costs.values()), costs
