"""The torch top-l kernel (clustering/topk.py) is exact: same top-l as a full sort, any K."""
import numpy as np
import torch


def test_grouped_top_l_matches_full_sort():
    from clustering.topk import TopK, top_l_grouped
    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 16 * 37, generator=g)
    v, i = top_l_grouped(s, 8, 16)
    v0, i0 = torch.topk(s, 8, dim=1)
    assert torch.equal(v, v0) and torch.equal(i, i0)
    # whole engine, K not a multiple of the group (padding), tile smaller than the input
    rng = np.random.default_rng(1)
    c = rng.standard_normal((1000, 24)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.standard_normal((700, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tk = TopK(c, 8, "torch", block_rows=256)
    assert tk.group > 0 and tk.tile_rows < len(x)
    lab, sims = tk.search(x)
    ref = np.argsort(-(x @ c.T), axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(lab, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(x @ c.T, ref, 1), rtol=1e-5, atol=1e-6)
    auto = TopK(c, 8, "auto")
    assert auto.engine in ("torch", "faiss") and set(auto.probe) == {"torch", "faiss"}
    np.testing.assert_array_equal(auto.search(x)[0], ref)


def test_assign_auto_engine_is_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    """engine=auto: the measured winner goes into state.json and a resumed run keeps it."""
    import json

    from test_clustering import assign, make_store

    from clustering import assign as asg
    monkeypatch.setattr(asg, "AUTO_PROBE_MIN_ROWS", 0)  # probe even this tiny store
    c, _ = make_store(tmp_path / "store", n_parts=3, rows=300, d=32, k=300)
    (tmp_path / "clusters").mkdir()
    np.save(tmp_path / "clusters/centroids.npy", c.astype(np.float32))
    man = assign(tmp_path, "assign.l=4", "assign.engine=auto")
    state_path = tmp_path / "clusters/labels/state.json"
    state = json.loads(state_path.read_text())
    assert man["engine"] == state["engine"] in ("torch", "faiss")
    other = "faiss" if state["engine"] == "torch" else "torch"
    state_path.write_text(json.dumps({**state, "engine": other}))  # as if the first run measured that
    (tmp_path / "clusters/labels/labels_1.npy").unlink()
    man = assign(tmp_path, "assign.l=4", "assign.engine=auto")
    assert man["engine"] == other and man["resumed_parts"] == 2
