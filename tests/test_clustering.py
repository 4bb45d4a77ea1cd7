"""Stage 2: k-means (faiss / two-level / distributed torch) and top-l assignment, on synthetic
stores written with pipeline.core.store.write_part."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT, torchrun
from sklearn.metrics import adjusted_rand_score

from pipeline.core.config import ConfigError
from pipeline.core.store import LabelStore, StoreError, write_part

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def make_store(root, n_parts=3, rows=600, d=32, k=16, noise=0.02, seed=0, shards=None, kinds=("joint",)):
    """Well-separated clusters on the sphere: unit centers + small noise. Returns (centers, truth)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = []
    for p in range(n_parts):
        y = rng.integers(0, k, rows)
        x = centers[y] + noise * rng.normal(size=(rows, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys = [f"{p:05d}{i:04d}" for i in range(rows)]
        shard = shards[p] if shards else f"/nonexistent/{p:05d}.tar"
        meta = pa.table({"key": keys, "caption": [f"c{c}" for c in y], "url": [""] * rows,
                         "shard": [shard] * rows, "shard_row": np.arange(rows, dtype=np.int64)})
        write_part(root, p, {kd: x for kd in kinds}, meta)
        truth.append(y)
    return centers, np.concatenate(truth)


def load_rows(store, kind="joint"):
    from pipeline.core.store import EmbeddingStore
    s = EmbeddingStore(store)
    return np.concatenate([s.load(kind, p, mmap=False).astype(np.float32) for p in s.parts(kind)])


def brute_topl(x, c, l):
    sims = x.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :l]
    return idx, np.take_along_axis(sims, idx, 1)


def kmeans(out, *over):
    from clustering import kmeans as km
    return km.main(None, [f"run.out_dir={out}", "cluster.points_per_centroid=1000", *over])


def assign(out, *over):
    from clustering import assign as asg
    return asg.main(None, [f"run.out_dir={out}", "assign.report=false", *over])


def test_kmeans_recovers_clusters_and_assign_matches_bruteforce(tmp_path):
    _, truth = make_store(tmp_path / "store")
    res = kmeans(tmp_path, "cluster.k=16", "cluster.niter=10", "cluster.checkpoint_every=3")
    c = np.load(tmp_path / "clusters/centroids.npy")
    assert c.shape == (16, 32) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    x = load_rows(tmp_path / "store")
    assert adjusted_rand_score(truth, (x @ c.T).argmax(1)) >= 0.95
    meta = json.loads((tmp_path / "clusters/clustering.json").read_text())
    assert meta["k"] == 16 and meta["dim"] == 32 and meta["sample_size"] == 1800 and meta["method"] == "faiss"
    assert 1 <= len(meta["objective"]) <= 10 and meta["cluster_sizes"]["empty"] == 0
    assert meta["config"]["cluster"]["k"] == 16 and not (tmp_path / "clusters/ckpt").exists()
    assert kmeans(tmp_path, "cluster.k=16", "cluster.niter=10", "cluster.checkpoint_every=3")["key"] == res["key"]

    man = assign(tmp_path, "assign.l=5")
    idx, sims = brute_topl(x, c, 5)
    lab = LabelStore(tmp_path / "clusters/labels")
    got = np.concatenate([lab.load(p)[0] for p in lab.parts()])
    gs = np.concatenate([lab.load(p)[1] for p in lab.parts()])
    assert got.dtype == np.int32 and gs.dtype == np.float16
    np.testing.assert_array_equal(got, idx)
    np.testing.assert_allclose(gs, sims, atol=2e-3)
    assert man["rows"] == 1800 and man["invalid_rows"] == 0 and man["exact"]


def test_assign_engines_and_invalid_rows(tmp_path):
    make_store(tmp_path / "store", n_parts=2, rows=300, d=24, k=8, noise=0.3)
    # bad rows in part 1: NaN, inf, zero norm -> label -1, sims 0, counted
    from pipeline.core.store import EmbeddingStore
    s = EmbeddingStore(tmp_path / "store")
    x1 = s.load("joint", 1, mmap=False).copy()
    x1[3, 0], x1[7, 5], x1[11] = np.nan, np.inf, 0
    write_part(tmp_path / "store", 1, {"joint": x1}, s.metadata(1))
    rng = np.random.default_rng(1)
    c = rng.normal(size=(50, 24)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    (tmp_path / "clusters").mkdir()
    np.save(tmp_path / "clusters/centroids.npy", c)
    x = load_rows(tmp_path / "store")
    valid = np.isfinite(x).all(1) & (np.abs(np.nan_to_num(x)).sum(1) > 0)
    xv = x.copy()
    xv[valid] /= np.linalg.norm(xv[valid], axis=1, keepdims=True)
    idx, _ = brute_topl(np.nan_to_num(xv), c, 6)
    for engine in ("torch", "faiss"):
        man = assign(tmp_path, "assign.l=6", f"assign.engine={engine}", "run.overwrite=true")
        lab = LabelStore(tmp_path / "clusters/labels")
        got = np.concatenate([lab.load(p)[0] for p in lab.parts()])
        assert man["invalid_rows"] == 3 and man["parts"][1]["invalid"] == 3
        assert (got[~valid] == -1).all()
        np.testing.assert_array_equal(got[valid], idx[valid])
    man = assign(tmp_path, "assign.l=6", "assign.engine=hnsw", "run.overwrite=true", "assign.recall_rows=300")
    assert not man["exact"] and man["recall_at_l"] >= 0.9


def test_two_level_and_torch_methods(tmp_path):
    _, truth = make_store(tmp_path / "store", n_parts=2, rows=800, k=24)
    x = load_rows(tmp_path / "store")
    flat = kmeans(tmp_path / "flat", f"cluster.store={tmp_path}/store", "cluster.k=24", "cluster.niter=8")
    tl = kmeans(tmp_path / "tl", f"cluster.store={tmp_path}/store", "cluster.k=24", "cluster.niter=8",
                "cluster.method=two_level", "cluster.coarse_k=4", "cluster.checkpoint_every=2")
    c = np.load(tmp_path / "tl/clusters/centroids.npy")
    assert c.shape == (24, 32) and tl["coarse_k"] == 4 and len(tl["objective"]) == 8
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    assert tl["objective_final"] >= 0.97 * flat["objective_final"]
    kmeans(tmp_path / "tq", f"cluster.store={tmp_path}/store", "cluster.k=24", "cluster.niter=8",
           "cluster.method=torch")
    ct = np.load(tmp_path / "tq/clusters/centroids.npy")
    assert adjusted_rand_score(truth, (x @ ct.T).argmax(1)) >= 0.95


def test_bad_inputs(tmp_path):
    make_store(tmp_path / "store", n_parts=2, rows=50, d=16, k=4)
    # K larger than the sample: one config error, nothing written
    with pytest.raises(ConfigError, match="larger than the sample"):
        kmeans(tmp_path, "cluster.k=200")
    assert not (tmp_path / "clusters").exists()
    # centroids with the wrong dim
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c/centroids.npy", np.eye(4, 8, dtype=np.float32))
    with pytest.raises(StoreError, match="don't match the store's dim 16"):
        assign(tmp_path, f"assign.centroids={tmp_path}/c/centroids.npy")
    assert not (tmp_path / "clusters/labels").exists()
    # the CLI prints one line and exits 1
    p = subprocess.run([sys.executable, "-m", "clustering.assign", f"run.out_dir={tmp_path}",
                        f"assign.centroids={tmp_path}/c/centroids.npy"], check=False, cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr
    # a part missing its metadata (incomplete): error naming it, or a counted skip when asked
    np.save(tmp_path / "c/centroids.npy", np.eye(12, 16, dtype=np.float32))
    (tmp_path / "store/metadata/metadata_1.parquet").rename(tmp_path / "m1.parquet")
    with pytest.raises(StoreError, match="metadata_1.parquet"):
        assign(tmp_path, f"assign.centroids={tmp_path}/c/centroids.npy")
    man = assign(tmp_path, f"assign.centroids={tmp_path}/c/centroids.npy", "assign.skip_incomplete=true")
    assert man["skipped_incomplete_parts"] == [1] and man["rows"] == 50
    (tmp_path / "m1.parquet").rename(tmp_path / "store/metadata/metadata_1.parquet")
    # parts with different dims / dtypes
    write_part(tmp_path / "store", 2, {"joint": np.ones((5, 12), np.float32)},
               pa.table({"key": list("abcde")}))
    with pytest.raises(StoreError, match="joint_emb_2.npy: dim/dtype 12"):
        kmeans(tmp_path / "x", f"cluster.store={tmp_path}/store", "cluster.k=4")
    write_part(tmp_path / "store", 2, {"joint": np.ones((5, 16), np.float32)},
               pa.table({"key": list("abcde")}), dtype=np.float32)
    with pytest.raises(StoreError, match="joint_emb_2.npy: dim/dtype 16/float32"):
        kmeans(tmp_path / "x", f"cluster.store={tmp_path}/store", "cluster.k=4")
    assert not (tmp_path / "x").exists()


def test_report_contact_sheets(tmp_path):
    from PIL import Image

    from pipeline.core.shards import ShardWriter, encode_image
    shards = []
    for p in range(2):
        w = ShardWriter(tmp_path / "shards", p)
        for i in range(40):
            img = Image.new("RGB", (32, 32), ((i * 37) % 255, (p * 90 + i * 11) % 255, 120))
            w.write(f"{p:05d}{i:04d}", *encode_image(img, "png"), caption=f"img {i}", meta={})
        w.close()
        shards.append(str(tmp_path / "shards" / f"{p:05d}.tar"))
    make_store(tmp_path / "store", n_parts=2, rows=40, d=16, k=4, shards=shards)
    kmeans(tmp_path, "cluster.k=4", "cluster.niter=5")
    assign(tmp_path, "assign.l=2", "assign.report=true", "assign.report_clusters=3", "assign.report_members=5")
    rep = tmp_path / "clusters/report"
    page = (rep / "index.html").read_text()
    sheets = sorted(rep.glob("sheet_*.png"))
    assert len(sheets) == 3 and (rep / "cluster_sizes.png").is_file() and (rep / "top1_similarity.png").is_file()
    from clustering.report import cluster_sizes
    from pipeline.core.store import LabelStore
    sizes, sim_sums, hist = cluster_sizes(LabelStore(tmp_path / "clusters/labels"))
    assert sizes.sum() == hist.sum() == 80 and np.all(sim_sums <= sizes + 1e-6)  # every row once; sims <= 1
    assert all(s.name in page for s in sheets) and "img " in page
    sheet = np.asarray(Image.open(sheets[0]))
    assert sheet.shape == (96, 96 * 5, 3) and sheet.std() > 5  # real pixels, not blank cells


@pytest.mark.slow
def test_assign_two_ranks_equal_one_rank(tmp_path):
    make_store(tmp_path / "store", n_parts=5, rows=300, d=16, k=8)
    kmeans(tmp_path, "cluster.k=8", "cluster.niter=5")
    assign(tmp_path, "assign.l=3")
    torchrun(["-m", "clustering.assign", f"run.out_dir={tmp_path}", "assign.l=3", "assign.report=false",
              f"assign.out_dir={tmp_path}/labels2"], nproc=2)
    one, two = LabelStore(tmp_path / "clusters/labels"), LabelStore(tmp_path / "labels2")
    assert one.parts() == two.parts() == list(range(5))
    for p in one.parts():
        for a, b in zip(one.load(p), two.load(p)):
            np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "labels2/manifest.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_distributed_kmeans_matches_single_process(tmp_path):
    make_store(tmp_path / "store", n_parts=3, rows=700, d=32, k=16, noise=0.1)
    over = [f"cluster.store={tmp_path}/store", "cluster.k=16", "cluster.niter=6",
            "cluster.points_per_centroid=100", "cluster.method=torch"]
    one = kmeans(tmp_path / "one", *over)
    torchrun(["-m", "clustering.kmeans", f"run.out_dir={tmp_path}/two", *over], nproc=2)
    two = json.loads((tmp_path / "two/clusters/clustering.json").read_text())
    assert two["world_size"] == 2 and two["sample_size"] == one["sample_size"] == 1600
    np.testing.assert_allclose(np.load(tmp_path / "two/clusters/centroids.npy"),
                               np.load(tmp_path / "one/clusters/centroids.npy"), atol=1e-4)
    np.testing.assert_allclose(two["objective"], one["objective"], rtol=1e-5)
    # faiss from the same seeded start lands on the same objective
    fa = kmeans(tmp_path / "fa", *over[:-1], "cluster.method=faiss")
    assert abs(fa["objective_final"] - one["objective_final"]) <= 1e-3 * one["objective_final"]


def _kill_when(cmd, path_glob, root, timeout=120):
    """Start ``cmd``, SIGKILL it as soon as ``root.glob(path_glob)`` finds a file."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not list(root.glob(path_glob)):
        assert p.poll() is None, f"finished before the kill: {p.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kmeans_kill_and_resume(tmp_path):
    make_store(tmp_path / "store", n_parts=2, rows=15000, d=64, k=64, noise=0.2)
    over = ["cluster.k=256", "cluster.niter=40", "cluster.checkpoint_every=2", "cluster.init=random"]
    _kill_when([sys.executable, "-m", "clustering.kmeans", f"run.out_dir={tmp_path}", *over,
                "cluster.points_per_centroid=1000"], "clusters/ckpt/state.json", tmp_path)
    assert not (tmp_path / "clusters/clustering.json").exists()
    st = json.loads((tmp_path / "clusters/ckpt/state.json").read_text())
    assert 2 <= st["iteration"] < 40
    p = subprocess.run([sys.executable, "-m", "clustering.kmeans", f"run.out_dir={tmp_path}", *over,
                        "cluster.points_per_centroid=1000"], check=False, cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "resuming k-means at iteration" in p.stderr, p.stderr[-3000:]
    ref = kmeans(tmp_path / "ref", f"cluster.store={tmp_path}/store", *over)
    np.testing.assert_allclose(np.load(tmp_path / "clusters/centroids.npy"),
                               np.load(tmp_path / "ref/clusters/centroids.npy"), atol=1e-4)
    got = json.loads((tmp_path / "clusters/clustering.json").read_text())
    np.testing.assert_allclose(got["objective"], ref["objective"], rtol=1e-5)


@pytest.mark.slow
def test_assign_kill_and_resume(tmp_path):
    make_store(tmp_path / "store", n_parts=6, rows=16000, d=64, k=8, noise=0.5)
    rng = np.random.default_rng(0)
    c = rng.normal(size=(1024, 64)).astype(np.float32)
    (tmp_path / "clusters").mkdir()
    np.save(tmp_path / "clusters/centroids.npy", c / np.linalg.norm(c, axis=1, keepdims=True))
    cmd = [sys.executable, "-m", "clustering.assign", f"run.out_dir={tmp_path}", "assign.report=false"]
    _kill_when(cmd, "clusters/labels/labels_*.json", tmp_path)  # a part is done with its record
    assert not (tmp_path / "clusters/labels/manifest.json").exists()
    p = subprocess.run(cmd, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    man = json.loads((tmp_path / "clusters/labels/manifest.json").read_text())
    assert 1 <= man["resumed_parts"] < 6 and man["rows"] == 96000
    # reference: same engine as the resumed run (auto measures afresh) and the same thread count
    # (faiss's sums, unlike torch's, depend on it)
    p = subprocess.run(cmd + ["assign.out_dir=" + str(tmp_path / "ref"), f"assign.engine={man['engine']}"],
                       check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = LabelStore(tmp_path / "clusters/labels"), LabelStore(tmp_path / "ref")
    for q in range(6):
        for u, v in zip(a.load(q), b.load(q)):
            np.testing.assert_array_equal(u, v)
