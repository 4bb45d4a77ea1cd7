"""Reliability and interop: clip-retrieval/LAION stores, training-input validation, run locks,
no unpickling of foreign checkpoint data, shard-spec/network policy, k-means restarts."""
from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def clip_retrieval_store(root, n_parts=12, rows=40, d=16, k=4, seed=0):
    """A store named exactly as clip-retrieval's writer names it: the part id zero-padded to
    int(log10(output_partition_count)) + 1 digits, metadata with its columns (no `key`)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    digits = int(math.log10(n_parts)) + 1
    for kind in ("img", "text"):
        (root / f"{kind}_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for p in range(n_parts):
        pid = str(p).zfill(digits)
        x = centers[rng.integers(0, k, rows)] + 0.05 * rng.normal(size=(rows, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{pid}.npy", x.astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{pid}.npy", x.astype(np.float16))
        keys = [f"{p:05d}{i:04d}" for i in range(rows)]
        pq.write_table(pa.table({"image_path": keys, "caption": [f"c{i}" for i in range(rows)],
                                 "url": [f"http://x/{k}.jpg" for k in keys]}),
                       root / "metadata" / f"metadata_{pid}.parquet")
    return digits


def test_clip_retrieval_padded_store_end_to_end(tmp_path):
    from clustering import assign as asg
    from clustering import kmeans as km
    from pipeline.store import EmbeddingStore, LabelStore, emb_path, part_name
    from training.data import TrainDataConfig, find_parts, load_part_labels

    store = tmp_path / "store"
    assert clip_retrieval_store(store) == 2
    assert (store / "img_emb/img_emb_00.npy").is_file() and (store / "metadata/metadata_11.parquet").is_file()
    st = EmbeddingStore(store)
    assert st.parts("img") == list(range(12)) and st.check("img")[3] == [40] * 12
    assert emb_path(store, "img", 3).name == "img_emb_03.npy" and part_name(store, 11) == "11"
    over = [f"run.out_dir={tmp_path}", "cluster.kind=img", "assign.kind=img"]
    km.main(None, over + ["cluster.k=4", "cluster.niter=5", "cluster.points_per_centroid=1000"])
    asg.main(None, over + ["assign.l=2", "assign.report=false"])
    labels = tmp_path / "clusters/labels"
    assert sorted(p.name for p in labels.glob("labels_*.npy")) == [f"labels_{i:02d}.npy" for i in range(12)]
    lab = LabelStore(labels)
    assert lab.parts() == list(range(12)) and lab.load(7)[0].shape == (40, 2)
    # a rerun finds every padded part done (resume), and training joins them by image_path
    asg.main(None, over + ["assign.l=2", "assign.report=false"])
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(12):
        (shards / f"{i:05d}.tar").write_bytes(b"")
    parts = find_parts(TrainDataConfig(shards=str(shards), store=str(store), labels=str(labels)), 2)
    assert len(parts) == 12 and parts[10].labels.endswith("labels_10.npy")
    table = load_part_labels(parts[3], 2, 4)
    assert len(table) == 40 and "000030000" in table


@pytest.mark.parametrize("method", ["faiss", "torch"])
def test_kmeans_nredo_keeps_best_run(tmp_path, method):
    from clustering import kmeans as km
    from test_clustering import make_store
    make_store(tmp_path / "store", n_parts=2, rows=400, d=16, k=12, noise=0.05)
    base = ["cluster.k=12", "cluster.niter=4", "cluster.init=random", f"cluster.method={method}",
            "cluster.points_per_centroid=1000"]
    one = km.main(None, [f"run.out_dir={tmp_path / 'a'}", f"cluster.store={tmp_path / 'store'}", *base])
    many = km.main(None, [f"run.out_dir={tmp_path / 'b'}", f"cluster.store={tmp_path / 'store'}", *base,
                          "cluster.nredo=4"])
    assert one["redo_objectives"] == [one["objective_final"]] and one["best_redo"] == 0
    assert len(many["redo_objectives"]) == 4 and len(set(many["redo_objectives"])) > 1  # other inits
    assert many["redo_objectives"][0] == pytest.approx(one["objective_final"], rel=1e-6)
    assert many["objective_final"] == max(many["redo_objectives"]) >= one["objective_final"]
    kept = np.load(tmp_path / "b/clusters/centroids.npy")
    x = np.concatenate([np.load(p).astype(np.float32) for p in sorted((tmp_path / "store/joint_emb").glob("*.npy"))])
    assert (x @ kept.T).max(1).sum() == pytest.approx(many["objective_final"], rel=1e-4)
