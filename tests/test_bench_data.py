"""The training-loader bench (training/bench_data.py) stays runnable: real demo shards through
training/data.py's loader, fast vs reference per core, and the fast path with 1 and 2 workers; and
`loader_rate`, the entry `make gpu-check` calls, runs its CPU variant. No timed assertion: rates
only have to exist; ratios are the rows' own arithmetic."""
import pytest


@pytest.mark.slow
def test_loader_bench_rows():
    from training.bench_data import ANCHORS, bench_loader
    rows = bench_loader(quick=True, model_rate=100.0, model_config="m")
    vs_old, vs_float, one_worker, pooled, workers, cores, vs_model = rows
    assert vs_old["bench"].startswith("train loader images/s per core, fast path (ours) vs the loader as")
    assert vs_float["bench"].startswith("train loader images/s per core, fast path (ours) vs the float path")
    assert one_worker["bench"].startswith("train loader images/s per core, 1 DataLoader worker")
    assert pooled["bench"].startswith("train loader images/s per core, 1 DataLoader worker, fast path: batches reused")
    assert vs_old["ours"] == vs_float["ours"] and one_worker["ours"] == pooled["ours"]  # one series, two references
    for row in (vs_old, vs_float, one_worker, pooled):
        assert row["ours"] > 0 and row["reference"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["reference"])
        assert "page faults per image (median) ours" in row["note"]
    assert workers["ours"] > 0 and workers["reference"] > 0
    per_core = float(cores["config"].split()[0].replace(",", ""))
    assert per_core >= max(one_worker["ours"], vs_old["ours"]) * 0.99
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


def test_tarfile_reference_reader_reads_the_same_samples(tmp_path):
    """The per-core row's reference reads the shards with Python's tarfile, as the loader did when
    issue 21 was filed; it must see the same samples, with the same bytes, as `read_samples`."""
    from pipeline.core.shards import expand_shards, read_samples
    from training.bench_data import synthetic_data, tarfile_samples
    spec, _, _ = synthetic_data(tmp_path, 40)
    url = expand_shards(spec)[0]
    old, new = list(tarfile_samples(url)), list(read_samples(url))
    assert len(new) == 40 and old == new
