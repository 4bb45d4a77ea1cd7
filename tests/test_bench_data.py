"""The training-loader bench (training/bench_data.py) stays runnable: real demo shards through
training/data.py's loader with 1 and 2 workers. No timed assertion: rates only have to exist."""
import pytest


@pytest.mark.slow
def test_loader_bench_rows():
    from training.bench_data import ANCHORS, bench_loader
    rows = bench_loader(quick=True, model_rate=100.0, model_config="m")
    assert [r["bench"].split(":")[0] for r in rows][0] == "train loader images/s"
    loader, cores, vs_model = rows
    assert loader["ours"] > 0 and loader["reference"] > 0
    per_core = float(cores["config"].split()[0].replace(",", ""))
    assert cores["ours"] == pytest.approx(ANCHORS["A100 40% MFU"] / per_core, rel=0.01)
    assert vs_model["reference"] == 100.0 and vs_model["ratio"] == pytest.approx(100.0 / vs_model["ours"])
