"""clustering/bench.py's peak-RSS rows run assign as `mlcd assign` does, in a child process
(`make bench` broke once when that entry point moved and no test ran it)."""


def test_bench_rss_runs_assign_in_a_child(tmp_path):
    from clustering.bench import bench_rss
    rows = bench_rss(quick=True, tmp=tmp_path)
    assert [r["bench"] for r in rows] == ["assign peak RSS, store x1", "assign peak RSS, store x4"]
    assert all(r["rss_mb"] > 50 for r in rows), rows  # the child's own VmHWM, torch imported
    for mult in (1, 4):
        assert (tmp_path / f"rss{mult}/clusters/labels/manifest.json").is_file()
