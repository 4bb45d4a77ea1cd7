"""Object storage through pipeline/core/fs.py, against a real S3 API server (moto's standalone
server on 127.0.0.1, tests/conftest.py:s3_server)."""
import io
import json
import os
import stat

import numpy as np
import pytest

from pipeline.core import fs
from tests.conftest import ROOT


@pytest.fixture
def remote_on(monkeypatch):
    monkeypatch.setenv("MLCD_ALLOW_REMOTE", "1")  # what netpolicy.apply(run) sets for run.allow_remote
    fs._CHECKED.clear()


def test_fs_roundtrip_on_s3(s3_bucket, remote_on):
    base = fs.join(s3_bucket, "run", "store")
    assert fs.is_remote(base) and base == f"{s3_bucket}/run/store"
    from pathlib import Path
    assert fs.url_of(Path(base) / "x.npy") == f"{base}/x.npy"  # pathlib folds s3:// to s3:/
    assert fs.check(base, "store", write=True) == base
    assert not fs.exists(base) and fs.ls(base) == []
    fs.makedirs(base)  # a no-op on object stores
    fs.write_bytes(fs.join(base, "b.bin"), b"\x00\x01" * 1000)
    fs.write_bytes(fs.join(base, "sub", "a.txt"), b"hello")
    assert fs.ls(base) == ["b.bin", "sub"]
    assert fs.isdir(base) and fs.isfile(fs.join(base, "b.bin")) and not fs.isfile(fs.join(base, "sub"))
    assert fs.size(fs.join(base, "b.bin")) == 2000
    assert fs.mtime_ns(fs.join(base, "b.bin")) > 1.7e18  # an upload time (ns since 1970)
    assert fs.read_bytes(fs.join(base, "sub", "a.txt")) == b"hello"
    with fs.open_read(fs.join(base, "b.bin")) as f:
        assert f.read(3) == b"\x00\x01\x00"
    assert fs.glob(fs.join(base, "*.bin")) == [fs.join(base, "b.bin")]
    fs.rm(fs.join(base, "b.bin"))
    fs.rm(fs.join(base, "b.bin"))  # missing_ok
    assert fs.ls(base) == ["sub"]
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(fs.join(base, "b.bin"))


def test_put_file_and_local_paths(s3_bucket, remote_on, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(10_000))
    fs.put_file(src, f"{s3_bucket}/x/w.bin")
    assert fs.read_bytes(f"{s3_bucket}/x/w.bin") == src.read_bytes()
    # plain paths and file:// URLs are local files: io writes them (atomically, the umask's mode)
    from pipeline.core import io as mio
    with pytest.raises(ValueError, match="a local path"):
        fs.put_file(src, f"file://{tmp_path}/copy/w.bin")
    mask = os.umask(0o022)
    try:
        mio.atomic_write_bytes(f"file://{tmp_path}/copy/w.bin", src.read_bytes())
    finally:
        os.umask(mask)
    assert (tmp_path / "copy" / "w.bin").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "copy" / "w.bin").stat().st_mode) == 0o644
    assert not fs.is_remote(f"file://{tmp_path}") and fs.local(f"file://{tmp_path}") == str(tmp_path)
    assert fs.ls(tmp_path / "copy") == ["w.bin"]


def test_bad_urls_stop_with_one_line(s3_server, s3_bucket, monkeypatch):
    fs._CHECKED.clear()
    monkeypatch.delenv("MLCD_ALLOW_REMOTE", raising=False)
    with pytest.raises(fs.FsError, match=r"store s3://.*refused unless run.allow_remote=true"):
        fs.check(f"{s3_bucket}/x", "store")
    monkeypatch.setenv("MLCD_ALLOW_REMOTE", "1")
    with pytest.raises(fs.FsError, match=r"no-such-bucket-xyz.*does not exist") as e:
        fs.check("s3://no-such-bucket-xyz/run", "store")
    assert "\n" not in str(e.value)
    with pytest.raises(fs.FsError, match=r"zz://b/x: unknown scheme zz://"):
        fs.check("zz://b/x", "labels")
    with pytest.raises(fs.FsError, match=r"gs://b/x: gs:// needs its fsspec backend"):
        fs.check("gs://b/x", "labels")


def test_wrong_endpoint_is_one_line_and_retries_are_counted(s3_server, remote_on, monkeypatch):
    import fsspec
    from conftest import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(fs, "BACKOFF_S", 0.01)
    fsspec.filesystem("s3").clear_instance_cache()  # a new endpoint needs a new client
    before = sum(fs.RETRIES.values())
    try:
        with pytest.raises(fs.FsError, match=r"s3://some-bucket/x.*cannot reach the endpoint") as e:
            fs.check("s3://some-bucket/x", "shards")
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
    assert "testing-secret" not in str(e.value) and "\n" not in str(e.value)
    assert sum(fs.RETRIES.values()) > before


def test_transient_errors_are_retried(monkeypatch):
    monkeypatch.setattr(fs, "BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return np.int64(7)
    before = fs.RETRIES["write"]
    assert fs._retry("write", "s3://b/k", flaky) == 7
    assert fs.RETRIES["write"] == before + 2
    with pytest.raises(ValueError):  # not transient: raised at once
        fs._retry("write", "s3://b/k", lambda: (_ for _ in ()).throw(ValueError("bad")))


def _clip_retrieval_read(root: str):
    """A store read the way clip-retrieval's consumers read it (not our reader): list
    ``img_emb/`` and ``metadata/`` through fsspec, pair files by sorted name, take the
    ``image_path`` column; names must be ``img_emb_`` + the part number zero-padded to
    int(log10(number of parts)) + 1 digits."""
    import math

    import fsspec
    import pyarrow.parquet as pq
    fsys, path = fsspec.core.url_to_fs(root)
    embs = sorted(fsys.ls(path + "/img_emb", detail=False))
    metas = sorted(fsys.ls(path + "/metadata", detail=False))
    width = int(math.log10(len(embs))) + 1
    assert [e.rsplit("/", 1)[1] for e in embs] == [f"img_emb_{str(i).zfill(width)}.npy" for i in range(len(embs))]
    assert [m.rsplit("/", 1)[1] for m in metas] == [f"metadata_{str(i).zfill(width)}.parquet" for i in range(len(embs))]
    rows = []
    for e, m in zip(embs, metas):
        with fsys.open(e, "rb") as f:
            arr = np.load(f)
        with fsys.open(m, "rb") as f:
            names = pq.read_table(f).column("image_path").to_pylist()
        assert arr.shape[0] == len(names)
        rows += list(zip(names, arr[:, 0].tolist()))
    return rows


def _write_store(root, parts=12, rows=3):
    import pyarrow as pa

    from pipeline.core import store
    width = store.part_width(parts)
    want = []
    for i in range(parts):
        keys = [f"{i:03d}{r:02d}" for r in range(rows)]
        emb = np.zeros((rows, 4), np.float32)
        emb[:, 0] = [i * 10 + r for r in range(rows)]
        table = pa.table({"key": keys, "caption": ["c"] * rows, "shard": [f"s3://b/{i:05d}.tar"] * rows})
        store.write_part(root, i, {"img": emb}, table, dtype=np.float32, width=width)
        want += list(zip(keys, emb[:, 0].tolist()))
    return want


@pytest.mark.parametrize("where", ["s3", "local"])
def test_store_reads_back_like_clip_retrieval(where, s3_bucket, remote_on, tmp_path):
    from pipeline.core import store
    root = f"{s3_bucket}/run/store" if where == "s3" else f"file://{tmp_path}/store"
    want = _write_store(root)
    assert _clip_retrieval_read(root) == want  # 12 parts: padded, paired by sorted name
    st = store.EmbeddingStore(root)
    parts, dim, dtype, counts = st.check("img")
    assert parts == list(range(12)) and dim == 4 and counts == [3] * 12
    assert store.read_keys(store.meta_path(root, 11)) == ["01100", "01101", "01102"]
    assert store.part_name(root, 7) == "07"
    meta = st.metadata(11)
    assert meta.column("image_path").to_pylist() == meta.column("key").to_pylist()
    assert meta.column("shard")[0].as_py() == "s3://b/00011.tar"
    got = [b for _, _, b in st.iter_blocks("img", 2)]
    assert np.concatenate(got)[:, 0].tolist() == [v for _, v in want]
    assert store.part_complete(root, 3, ["img"]) and not store.part_complete(root, 12, ["img"])


def test_label_store_on_s3(s3_bucket, remote_on):
    from pipeline.core import store
    root = f"{s3_bucket}/run/labels"
    lab = np.arange(12, dtype=np.int32).reshape(6, 2)
    store.write_labels(root, "03", lab, lab.astype(np.float16) / 10, record={"part": 3})
    ls = store.LabelStore(root)
    assert ls.parts() == [3]
    got, sims = ls.load(3)
    assert (got == lab).all() and sims.dtype == np.float16
    assert store.read_label_record(root, 3) == {"part": 3}
    store.settle_label_state(root, {"k": 2}, None, overwrite=False)
    assert fs.ls(root) == ["labels_03.json", "labels_03.npy", "sims_03.npy", "state.json"]
    store.settle_label_state(root, {"k": 3}, {"k": 2}, overwrite=False)  # changed: parts dropped
    assert fs.ls(root) == ["state.json"]


def test_written_files_follow_the_umask(tmp_path):
    """Every file a stage writes gets the umask's mode (0644 under 022), including a file the
    writer replaced inside atomic_path (safetensors' save_file): before, it kept mkstemp's 0600."""
    import torch
    from safetensors.torch import save_file

    from pipeline.core import io
    mask = os.umask(0o022)
    try:
        io.atomic_save_npy(tmp_path / "a.npy", np.zeros(3))
        io.atomic_write_json(tmp_path / "a.json", {"a": 1})
        with io.atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        _write_store(tmp_path / "store", parts=2, rows=1)
    finally:
        os.umask(mask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 7
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


# ---------------------------------------------------------------- stages on the bucket

def _s3_count(url: str, suffix: str) -> int:
    try:
        return sum(n.endswith(suffix) for n in fs.ls(url))
    except fs.FsError:
        return 0


@pytest.fixture
def s3_shards(s3_bucket, remote_on, tmp_path):
    """12 tiny shards (tests/test_embed.py's) uploaded to the bucket, and a reference store
    embedded from their local copies."""
    from tests.test_embed import run_embed, tiny_args, write_shards
    local = write_shards(tmp_path / "shards", 12, 16)
    for p in local:
        fs.put_file(p, f"{s3_bucket}/data/{os.path.basename(p)}")
    ref = tmp_path / "ref"
    p = run_embed(tiny_args(tmp_path, str(tmp_path / "shards"), ref, "embed.workers=1"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return tmp_path, ref


@pytest.mark.slow
def test_embed_on_s3_killed_and_resumed_equals_local(s3_bucket, s3_shards):
    """embed reads shards from the bucket and writes its store there; SIGKILL mid-run, rerun:
    only the parts without their marker are redone, and the store equals the local one."""
    import signal
    import time

    from tests.test_embed import run_embed, tiny_args
    tmp, ref = s3_shards
    store = f"{s3_bucket}/run/store"
    args = tiny_args(tmp, f"{s3_bucket}/data/", store, "embed.workers=1", "run.allow_remote=true")
    p = run_embed(args, start_new_session=True)
    deadline = time.time() + 240
    while _s3_count(f"{store}/metadata", ".parquet") < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "run finished before it could be killed: " + p.stderr.read()[-2000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    n_killed = _s3_count(f"{store}/metadata", ".parquet")
    assert 2 <= n_killed < 12 and not fs.exists(f"{store}/manifest.json")
    p = run_embed(args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"{n_killed} done, {12 - n_killed} to do" in err
    assert "testing-secret" not in err
    _assert_same_store(ref, store)
    names = fs.ls(f"{store}/img_emb")
    assert names == [f"img_emb_{i:02d}.npy" for i in range(12)]  # 12 parts: padded to 2 digits
    meta = store_meta(store, 3)
    assert meta["shard"][0] == f"{s3_bucket}/data/00003.tar" and meta["image_path"] == meta["key"]
    manifest = json.loads(fs.read_bytes(f"{store}/manifest.json"))
    assert manifest["complete"] and manifest["part_digits"] == 2 and "testing-secret" not in json.dumps(manifest)

    # stage 2 on the bucket: k-means and assign read the store there and write centers, labels
    # and the report (contact sheets from the shards in the bucket) there; same as on disk
    from pipeline.core.store import LabelStore
    clusters = f"{s3_bucket}/run/clusters"
    _cluster_and_assign(store, clusters, tmp / "run-s3")
    _cluster_and_assign(str(ref), str(tmp / "clusters"), tmp / "run-local")
    np.testing.assert_array_equal(np.load(io.BytesIO(fs.read_bytes(f"{clusters}/centroids.npy"))),
                                  np.load(tmp / "clusters" / "centroids.npy"))
    la, lb = LabelStore(f"{clusters}/labels"), LabelStore(tmp / "clusters" / "labels")
    assert la.parts() == lb.parts() == list(range(12))
    assert fs.ls(f"{clusters}/labels")[:3] == ["config.assign.yaml", "labels_00.json", "labels_00.npy"]
    assert fs.ls(f"{clusters}/labels") == sorted(n for n in os.listdir(tmp / "clusters" / "labels")
                                                 if not n.startswith("."))  # .progress, .lock: local only
    for p in la.parts():
        for x, y in zip(la.load(p), lb.load(p)):
            np.testing.assert_array_equal(x, y)
    report = fs.ls(f"{clusters}/report")
    assert "index.html" in report and sum(n.startswith("sheet_") for n in report) == 4
    assert fs.ls(f"{clusters}/report") == sorted(os.listdir(tmp / "clusters" / "report"))
    _train_export_eval(s3_bucket, tmp)


def store_meta(root, part):
    from pipeline.core.store import EmbeddingStore
    return EmbeddingStore(root).metadata(part).to_pydict()


def _assert_same_store(a, b):
    from pipeline.core.store import EmbeddingStore
    sa, sb = EmbeddingStore(a), EmbeddingStore(b)
    assert sa.parts("img") == sb.parts("img") == list(range(12))
    for p in sa.parts("img"):
        assert sa.metadata(p).column("key").to_pylist() == sb.metadata(p).column("key").to_pylist()
        for k in sa.kinds:
            np.testing.assert_array_equal(np.asarray(sa.load(k, p)), np.asarray(sb.load(k, p)))


def _cluster_and_assign(store: str, out: str, run_dir) -> None:
    from clustering import assign, kmeans
    common = [f"run.out_dir={run_dir}", "run.allow_remote=true"]
    kmeans.main(str(ROOT / "configs/debug.yaml"), [*common, f"cluster.store={store}", f"cluster.out_dir={out}",
                                                   "cluster.k=8", "cluster.points_per_centroid=1000"])
    assign.main(str(ROOT / "configs/debug.yaml"), [*common, f"assign.store={store}", "assign.l=2",
                                                   f"assign.centroids={out}/centroids.npy",
                                                   f"assign.out_dir={out}/labels", f"assign.report_dir={out}/report"])


def _train_export_eval(s3_bucket: str, tmp) -> None:
    """Stage 3 from the bucket: train reads the shards, the store, the labels and the centers
    there (checkpoints stay on a POSIX path); export writes the HF folder to the bucket; eval
    writes its results there."""
    import textwrap

    from tests.conftest import torchrun
    from tests.test_train import TINY
    run, clusters = f"{s3_bucket}/run", f"{s3_bucket}/run/clusters"
    data = [f"train.data.shards={s3_bucket}/data/", f"train.data.store={run}/store",
            f"train.data.labels={clusters}/labels", f"train.centroids={clusters}/centroids.npy"]
    common = [f"run.out_dir={tmp / 'run-s3'}", "run.allow_remote=true", *TINY, "train.loss.num_labels=2",
              "train.steps=4", f"train.out_dir={tmp / 'train'}"]
    torchrun(["-m", "training.train", *common, *data], 1, timeout=400)
    assert (tmp / "train" / "metrics.jsonl").is_file()
    from pipeline.core.config import ConfigError
    from training.config import TrainConfig
    with pytest.raises(ConfigError, match=r"out_dir.*DeepSpeed checkpoints need a POSIX path"):
        TrainConfig(out_dir=f"{run}/train")

    from training.export import export
    export(str(tmp / "train"), f"{run}/export")
    assert {"config.json", "model.safetensors", "mlcd_export.json"} <= set(fs.ls(f"{run}/export"))

    from training.evaluation import evaluate as ev
    cfg = tmp / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""
        run: {{out_dir: {tmp / 'run-eval'}, allow_remote: true}}
        eval:
          out_dir: {run}/eval
          datasets:
            - {{name: boxes, train: {tmp / 'shards'}, test: {tmp / 'shards'}}}
          models:
            - {{name: ours, kind: checkpoint, path: {tmp / 'train'},
                model: {{name: vit_tiny_rope2d, image_size: 32, patch_size: 8, width: 32, layers: 1,
                        heads: 2, mlp_dim: 64, embed_dim: 16}}}}
          linear: {{c_grid: [1.0]}}
          knn: {{ks: [2]}}
          batch_size: 32
          workers: 0
        """))
    ev.main(str(cfg), [])
    res = json.loads(fs.read_bytes(f"{run}/eval/results.json"))
    assert [(r["model"], r["dataset"]) for r in res["results"]] == [("ours", "boxes")]
    assert "results.md" in fs.ls(f"{run}/eval")


# ---------------------------------------------------------------- RICE regions on the bucket

def _regions_chain(tmp, shards: str, boxes: str, root: str, tag: str) -> dict:
    """regions (stage 1b) -> assign on the region store (fixed centers) -> region-labels, every
    input and output under ``root`` (a local folder or a bucket prefix)."""
    from clustering import assign, region_labels
    from pipeline.core.io import atomic_save_npy
    from tests.test_regions import run_regions
    common = [f"run.out_dir={tmp / ('run-' + tag)}", "run.allow_remote=true"]
    run_regions(tmp, *common, f"regions.input={shards}", f"regions.boxes_dir={boxes}",
                f"regions.out_dir={root}/store", "regions.ocr=none", "regions.min_edge=8",
                "regions.workers=2")  # forked workers read the shards and box files
    c = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)  # TINY_CLIP: 16-d
    atomic_save_npy(f"{root}/centroids.npy", c / np.linalg.norm(c, axis=1, keepdims=True))
    assign.main(None, [*common, f"assign.store={root}/store", "assign.kind=img", "assign.l=2",
                       f"assign.centroids={root}/centroids.npy", f"assign.out_dir={root}/labels",
                       "assign.report=false"])
    return region_labels.main(None, [*common, f"region_labels.store={root}/store",
                                     f"region_labels.labels={root}/labels", f"region_labels.out_dir={root}/rlabels",
                                     f"region_labels.centroids={root}/centroids.npy"])


def test_regions_and_region_labels_on_s3_equal_local(s3_bucket, remote_on, tmp_path, capfd):
    """Stage 1b (2 forked DataLoader workers) reads shards and box files from the bucket and writes
    its region store there;
    assign and region-labels read it back and write their labels there: equal to the same
    chain on local disk, and every part's marker is in the bucket."""
    import shutil

    from pipeline.core.store import EmbeddingStore, LabelStore, labels_path
    from tests.test_regions import _boxed_shard
    _boxed_shard(tmp_path)  # 3 images, one box of each kind of skip
    shutil.copy(tmp_path / "shards" / "00000.tar", tmp_path / "shards" / "00001.tar")
    shutil.copy(tmp_path / "boxes" / "00000.parquet", tmp_path / "boxes" / "00001.parquet")
    for sub in ("shards", "boxes"):
        for p in sorted((tmp_path / sub).iterdir()):
            fs.put_file(p, f"{s3_bucket}/{sub}/{p.name}")
    import re
    remote = _regions_chain(tmp_path, f"{s3_bucket}/shards/", f"{s3_bucket}/boxes", f"{s3_bucket}/rice", "s3")
    err = capfd.readouterr().err  # the stages' log lines name the URLs as given
    assert f"-> {s3_bucket}/rice/store" in err and f"-> {s3_bucket}/rice/rlabels" in err
    assert not re.search(r"s3:/[^/]", err), "a URL logged as pathlib folded it"
    local = _regions_chain(tmp_path, str(tmp_path / "shards"), str(tmp_path / "boxes"), str(tmp_path / "rice"), "local")
    drop = ("store", "labels", "centroids", "wall_s")
    assert {k: v for k, v in remote.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}
    assert remote["counts"]["regions"] == 6 and remote["counts"]["ocr"] == 2
    sa, sb = EmbeddingStore(f"{s3_bucket}/rice/store"), EmbeddingStore(tmp_path / "rice" / "store")
    assert sa.parts("img") == sb.parts("img") == [0, 1]
    for p in (0, 1):
        ma, mb = sa.metadata(p).to_pydict(), sb.metadata(p).to_pydict()
        assert ma.pop("shard") == [f"{s3_bucket}/shards/0000{p}.tar"] * 3
        mb.pop("shard")
        assert ma == mb
        np.testing.assert_array_equal(np.asarray(sa.load("img", p)), np.asarray(sb.load("img", p)))
        np.testing.assert_array_equal(mio_load(labels_path(f"{s3_bucket}/rice/rlabels", p)),
                                      mio_load(labels_path(tmp_path / "rice" / "rlabels", p)))
    assert LabelStore(f"{s3_bucket}/rice/labels").parts() == [0, 1]
    from training.region_data import LabelSpace  # what train reads of region-labels' output
    assert LabelSpace.read(f"{s3_bucket}/rice/rlabels").num_classes == local["num_classes"] > 3
    assert "stats.json" in fs.ls(f"{s3_bucket}/rice/store")
    assert fs.ls(f"{s3_bucket}/rice/rlabels") == sorted(n for n in os.listdir(tmp_path / "rice" / "rlabels")
                                                        if not n.startswith("."))


def mio_load(path):
    from pipeline.core.io import load_npy
    return load_npy(path)


def _upload_tree(local, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            fs.put_file(p, f"{url}/{p.relative_to(local).as_posix()}")


def test_train_loader_workers_read_the_bucket_after_fork(s3_bucket, remote_on, tmp_path):
    """DataLoader workers (fork) read shards, metadata and labels from the bucket after the parent
    used s3fs (listing, checks): fsspec keys its instance cache and its IO loop by pid and resets
    both in a forked child (fsspec/spec.py, asyn.py ``register_at_fork``), and pipeline/core/fs.py
    asks for the filesystem per call, so no parent instance or loop is used in a worker. The
    batches equal those read from local disk with the same workers."""
    import torch

    from tests.test_train import build_synthetic
    from training.data import TrainDataConfig, find_parts, make_loader
    build_synthetic(tmp_path / "syn", shards=2, per_shard=20)
    _upload_tree(tmp_path / "syn", f"{s3_bucket}/syn")
    fs.ls(f"{s3_bucket}/syn")  # the parent's s3fs instance and IO thread exist before the fork

    def batches(root: str) -> list:
        cfg = TrainDataConfig(shards=f"{root}/data/train", store=f"{root}/store", labels=f"{root}/clusters/labels",
                              batch_size=4, workers=2, shuffle_buffer=8)
        parts = find_parts(cfg, 3)
        return list(make_loader(parts, cfg, 16, 3, 24, seed=1, rank=0, epoch=0, num_batches=6))
    remote, local = batches(f"{s3_bucket}/syn"), batches(str(tmp_path / "syn"))
    assert len(remote) == len(local) == 6
    for a, b in zip(remote, local):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    fs.ls(f"{s3_bucket}/syn")  # and the parent's instance still works after its children ran


@pytest.mark.slow
def test_train_steps_with_workers_from_the_bucket(s3_bucket, remote_on, tmp_path):
    """training.train under torchrun reads shards, store, labels, centers and RICE's region store
    and region labels from the bucket with train.data.workers=2 (forked DataLoader workers) and
    trains its steps, the region loss included."""
    from tests.test_rice_train import N_REGION, build_region_store
    from tests.test_train import build_synthetic, read_metrics, run_train
    build_synthetic(tmp_path / "syn", shards=2, per_shard=20)
    build_region_store(tmp_path / "syn" / "regions", tmp_path / "syn" / "store")
    syn = f"{s3_bucket}/syn"
    _upload_tree(tmp_path / "syn", syn)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.io import atomic_path
    for i in range(2):  # the store in the bucket names the shards there (as embed from the bucket writes)
        t = pq.read_table(tmp_path / "syn" / "store" / "metadata" / f"metadata_{i}.parquet")
        t = t.set_column(t.column_names.index("shard"), "shard",
                         pa.array([f"{syn}/data/train/{i:05d}.tar"] * t.num_rows))
        with atomic_path(f"{syn}/store/metadata/metadata_{i}.parquet") as tmp:
            pq.write_table(t, tmp)
    p = run_train(tmp_path, 1, ["run.allow_remote=true", f"train.data.shards={syn}/data/train",
                                f"train.data.store={syn}/store", f"train.data.labels={syn}/clusters/labels",
                                f"train.centroids={syn}/clusters/centroids.npy", "train.data.workers=2",
                                "train.steps=4", f"train.out_dir={tmp_path / 'train'}", "train.regions.enabled=true",
                                f"train.regions.store={syn}/regions/store", f"train.regions.labels={syn}/regions/labels",
                                "train.regions.per_image=2", "train.regions.num_labels=2"])
    import yaml
    cfg = yaml.safe_load((tmp_path / "train" / "config.train.yaml").read_text())
    assert cfg["train"]["data"]["workers"] == 2 and cfg["train"]["data"]["shards"].startswith("s3://")
    m = read_metrics(tmp_path)
    assert sorted(m) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in m.values())
    assert all(np.isfinite(r["region_loss"]) and r["regions_valid"] > 0 for r in m.values())
    assert f"{N_REGION} region classes" in p.stdout + p.stderr  # label_space.json read from the bucket


def test_region_loader_reads_the_bucket_like_local(s3_bucket, remote_on, tmp_path):
    """Train's region data (training/region_data.py) from the bucket: shards, the image store and
    labels, the region store and region labels, read by 2 forked DataLoader workers; the batches
    (images, labels, boxes, region labels) equal those read from local disk."""
    import torch

    from tests.test_region_data import K, V, _load, build
    from training.data import TrainDataConfig
    from training.region_data import RegionSpec, find_region_parts
    build(tmp_path / "r")
    _upload_tree(tmp_path / "r", f"{s3_bucket}/r")

    def batches(root: str) -> list:
        cfg = TrainDataConfig(shards=f"{root}/data/train", store=f"{root}/store", labels=f"{root}/labels",
                              batch_size=4, workers=2, shuffle_buffer=6)
        spec = RegionSpec(f"{root}/regions", f"{root}/region_labels", 3, 2, K + V)
        parts = find_region_parts(cfg, spec, 1)
        assert [p.region_meta is not None for p in parts] == [True, True, False]  # last shard: no regions
        return _load(parts, cfg, spec)
    remote, local = batches(f"{s3_bucket}/r"), batches(str(tmp_path / "r"))
    assert len(remote) == len(local) == 6
    for a, b in zip(remote, local):
        assert a.keys == b.keys
        for f in ("images", "labels", "boxes", "region_labels", "region_valid"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert any(bool(b.region_valid.any()) for b in remote)


def test_eval_regions_writes_results_and_its_cache_to_the_bucket(s3_bucket, remote_on, tmp_path):
    """eval-regions with ``eval_regions.out_dir`` in the bucket (probe scenes local): results and
    the feature cache land there, and a rerun reuses the cached features."""
    from tests.test_eval_regions import TINY, _probe_scenes
    from training.evaluation import regions as R
    _probe_scenes(tmp_path / "probe/train", 30, 1)
    _probe_scenes(tmp_path / "probe/test", 12, 2)
    out = f"{s3_bucket}/eval_regions"
    models = json.dumps([{"name": "random_init", "kind": "random", "model": TINY, "seed": 0}])
    over = [f"run.out_dir={tmp_path}", "run.allow_remote=true", f"eval_regions.out_dir={out}",
            f"eval_regions.train={tmp_path}/probe/train", f"eval_regions.test={tmp_path}/probe/test",
            f"eval_regions.models={models}", "eval_regions.workers=0", "eval_regions.linear.c_grid=[1.0]"]
    report = R.main(None, over)
    assert json.loads(fs.read_bytes(f"{out}/results.json"))["results"] == report["results"]
    assert {"results.json", "results.md", "config.eval_regions.yaml", "features"} <= set(fs.ls(out))
    cached = f"{out}/features/random_init/regions_test.npy"
    t = fs.mtime_ns(cached)
    again = R.main(None, over)
    assert fs.mtime_ns(cached) == t and again["results"] == report["results"]
