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
    from pipeline.core.store import EmbeddingStore, LabelStore, emb_path, part_name
    from training.data import TrainDataConfig, find_parts, load_part_labels

    store = tmp_path / "store"
    assert clip_retrieval_store(store) == 2
    assert (store / "img_emb/img_emb_00.npy").is_file() and (store / "metadata/metadata_11.parquet").is_file()
    st = EmbeddingStore(store)
    assert st.parts("img") == list(range(12)) and st.check("img")[3] == [40] * 12
    assert emb_path(store, "img", 3).name == "img_emb_03.npy" and part_name(store, 11) == "11"
    over = [f"run.out_dir={tmp_path}", "cluster.kind=img", "assign.kind=img"]
    km.main(None, over + ["cluster.k=4", "cluster.niter=5", "cluster.points_per_centroid=1000"])
    asg.main(None, over + ["assign.l=2", "assign.report_clusters=2"])  # report: no `key` column either
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
    from test_clustering import make_store

    from clustering import kmeans as km
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


# ---------------------------------------------------------------- one writer per folder

def test_folder_lock_refuses_second_writer_and_takes_over_stale(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from pipeline.core import lock
    from pipeline.core.errors import InputError
    with lock.folder_lock(tmp_path / "out", "first") as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(lock.LockError, match=r"in use by pid \d+ on .* \(first\)") as e:
            lock.acquire(tmp_path / "out", "second")
        assert isinstance(e.value, InputError) and "\n" not in str(e.value)
    assert not path.exists()  # released on exit
    # a run killed with SIGKILL leaves its lock behind: its pid is dead on this host -> stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "start": 0, "what": "x"}))
    with lock.folder_lock(tmp_path / "out", "third") as p2:
        assert json.loads(p2.read_text())["what"] == "third"
    # a live pid that is not the owner (reused: other start time) does not hold the folder
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": 0, "what": "x",
                                "proc_start": "1"}))
    with lock.folder_lock(tmp_path / "out", "fourth"):
        pass
    # another host's lock is never broken automatically
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-host", "start": 0, "what": "x"}))
    with pytest.raises(lock.LockError, match="elsewhere-host"):
        lock.acquire(tmp_path / "out")


def test_stage_refuses_folder_held_by_live_run(tmp_path, capsys):
    """A real second process holds the k-means folder; `python -m clustering.kmeans` on the same
    folder exits 1 with one line; once the holder is gone the run goes through."""
    import subprocess
    import sys

    from test_clustering import make_store

    from clustering import kmeans as km
    from pipeline.core.entry import stage_cli
    make_store(tmp_path / "store", n_parts=1, rows=200, d=8, k=4)
    folder = tmp_path / "clusters"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.core import lock; "
                               f"lock.acquire({str(folder)!r}, 'holder'); print('held', flush=True); "
                               "time.sleep(120)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [f"run.out_dir={tmp_path}", "cluster.k=4", "cluster.niter=2"]
        with pytest.raises(SystemExit) as e:
            stage_cli("cluster", args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and f"{folder} is in use by pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()
    assert km.main(None, args)["k"] == 4  # dead holder: stale lock taken over
    assert not (folder / ".mlcd.lock").exists()


# ---------------------------------------------------------------- shard specs and downloads

def test_pipe_and_remote_specs_need_opt_in(tmp_path, monkeypatch):
    from pipeline.core import netpolicy
    from pipeline.core.config import ConfigError, RunConfig
    from pipeline.core.shards import ShardSpecError, expand_shards
    for var in ("MLCD_ALLOW_PIPE", "MLCD_ALLOW_REMOTE", "MLCD_ALLOW_DOWNLOAD", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    marker = tmp_path / "pwned"
    lst = tmp_path / "list.txt"
    lst.write_text(f"# shards\n{tmp_path}/a.tar\npipe:touch {marker}; cat {tmp_path}/a.tar\n")
    with pytest.raises(ShardSpecError, match=rf"{lst}:3: 'pipe:touch .*run.allow_pipe=true"):
        expand_shards(str(lst))
    with pytest.raises(ShardSpecError, match="run.allow_remote=true"):
        expand_shards("https://example.com/{00000..00002}.tar")
    (tmp_path / "remote.txt").write_text("s3://bucket/00000.tar\n")
    with pytest.raises(ShardSpecError, match=r"remote.txt:1: 's3://bucket/00000.tar' is a remote URL"):
        expand_shards(str(tmp_path / "remote.txt"))
    (tmp_path / "a.tar").touch()
    assert expand_shards(f"file://{tmp_path}/a.tar") == [f"file://{tmp_path}/a.tar"]  # local
    netpolicy.apply(RunConfig(allow_pipe=True, allow_remote=True))
    assert expand_shards(str(lst))[1].startswith("pipe:touch")
    assert len(expand_shards("https://example.com/{00000..00002}.tar")) == 3
    assert not marker.exists()  # expanding never runs anything
    # downloads: offline for HF, and an open_clip tag that is not local is refused in one line
    netpolicy.apply(RunConfig())
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    import huggingface_hub.constants as hc
    assert hc.HF_HUB_OFFLINE is True
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"pretrained='openai' \(open_clip ViT-B-32\).*run.allow_download"):
        netpolicy.check_open_clip("ViT-B-32", "openai")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"")
    netpolicy.check_open_clip("ViT-B-32", str(weights))  # a local file is fine
    netpolicy.apply(RunConfig(allow_download=True))
    assert os.environ["HF_HUB_OFFLINE"] == "0" and hc.HF_HUB_OFFLINE is False
    netpolicy.check_open_clip("ViT-B-32", "openai")
    netpolicy.apply(RunConfig())


def test_stage_module_started_directly_is_offline(tmp_path):
    """`python -m training.evaluation.evaluate` (no mlcd, no Makefile): an open_clip tag is refused before any
    download, with one line and exit 2; HF offline is set in the process."""
    import subprocess
    import sys
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    cfg = tmp_path / "eval.yaml"
    shards = tmp_path / "d"
    from PIL import Image
    for c in ("cat", "dog"):
        (shards / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(shards / c / f"{i}.png")
    cfg.write_text(f"""
run: {{out_dir: {tmp_path}/run}}
eval:
  models: [{{name: oc, kind: open_clip, arch: ViT-B-32, pretrained: openai}}]
  datasets: [{{name: d, train: {shards}, test: {shards}}}]
""")
    p = subprocess.run([sys.executable, "-m", "training.evaluation.evaluate", "--config", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    err = [ln for ln in p.stderr.splitlines() if "WARNING" not in ln and ln.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "run.allow_download" in err[-1] and "Traceback" not in p.stderr


# ---------------------------------------------------------------- training inputs

def _train_inputs(tmp_path):
    from test_train import TINY, build_synthetic, synthetic_overrides
    build_synthetic(tmp_path / "syn", shards=2, per_shard=12, k=24)
    return [f"run.out_dir={tmp_path / 'run'}", *TINY, *synthetic_overrides(tmp_path / "syn"), "train.steps=1"]


def test_training_inputs_validated_up_front(tmp_path, caplog):
    from pipeline.core.config import load_config
    from pipeline.core.dist import DistContext
    from pipeline.core.io import atomic_save_npy
    from pipeline.core.shards import ShardSpecError
    from training.train import TrainConfig
    from training.validate import TrainInputError, check_inputs
    over = _train_inputs(tmp_path)
    syn = tmp_path / "syn"

    def check(*extra):
        check_inputs(load_config(None, [*over, *extra], "train", TrainConfig)[1], DistContext())

    check()  # the good inputs pass
    with pytest.raises(TrainInputError, match=r"labels_\d.npy: label 2\d at row \d+ is outside \[-1, 20\)"):
        check("train.partial_fc.num_classes=20")
    with caplog.at_level("WARNING"):
        check("train.partial_fc.num_classes=30")  # larger than the centroids' K: on purpose, warned
    assert "num_classes=30 differs from the 24 centroids" in caplog.text
    with pytest.raises(TrainInputError, match="nope.npy: k-means centroids not found"):
        check(f"train.centroids={tmp_path}/nope.npy")
    with pytest.raises(TrainInputError, match="embedding store not found"):
        check(f"train.data.store={tmp_path}/nostore")
    with pytest.raises(ShardSpecError, match="train.data.shards=.*shard spec .* matches no file"):  # exit 2, as in embed
        check(f"train.data.shards={tmp_path}/nothing/{{00000..00001}}.tar")
    # a labels folder from another store: row counts differ from the metadata
    lab = syn / "clusters/labels/labels_0.npy"
    atomic_save_npy(lab, np.zeros((5, 3), np.int32))
    with pytest.raises(TrainInputError, match=r"labels_0.npy: 5 label rows but .*metadata_0.parquet has 11: "
                                              r"not row-aligned"):
        check()
    bad = tmp_path / "garbage.npy"
    bad.write_bytes(b"not an npy file")
    with pytest.raises(TrainInputError, match="garbage.npy: unreadable centroids"):
        check(f"train.centroids={bad}")
    lab.write_bytes(b"not an npy file")
    with pytest.raises(TrainInputError, match="labels_0.npy: unreadable labels"):
        check()


@pytest.mark.slow
def test_bad_training_input_under_mlcd_two_ranks_is_one_line(tmp_path):
    """`mlcd train --nproc 2` with labels beyond K: exit 1, the reason in one line, no traceback
    (neither a worker's nor the torchrun agent's), before DeepSpeed is set up."""
    import subprocess
    import sys
    over = _train_inputs(tmp_path)
    p = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--nproc", "2", *over,
                        "train.partial_fc.num_classes=20"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "DeepSpeed" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "is outside [-1, 20)" in errors[0] and "labels_" in errors[0]
    assert not (tmp_path / "run/train/checkpoints").exists()


# ---------------------------------------------------------------- no pickled code from checkpoints

class _Payload:
    """Unpickling this runs `touch <marker>` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_checkpoint_is_refused(tmp_path):
    """A real ZeRO-2 checkpoint whose DeepSpeed optimizer file is replaced by a pickle that would
    run code: export (zero_to_fp32), resume (engine.load_checkpoint) and the re-shard loader all
    refuse it in one line, and the payload never runs."""
    import subprocess
    import sys

    import torch

    from training.checkpoint import find_latest, load_backbone_state_dict
    from training.safe_load import UnsafeCheckpoint
    over = _train_inputs(tmp_path) + ["train.deepspeed.zero_stage=2", "train.checkpoint.every=1"]
    p = subprocess.run([sys.executable, "-m", "training.train", *over], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    step = find_latest(tmp_path / "run/train/checkpoints")
    assert load_backbone_state_dict(step)  # the genuine checkpoint loads weights-only
    marker = tmp_path / "pwned"
    optim = next(step.glob("*zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": _Payload(marker)}, optim)
    with pytest.raises(UnsafeCheckpoint, match=r"refused to load the pickled global (posix|os)\.system"):
        load_backbone_state_dict(step)
    assert not marker.exists()
    ex = subprocess.run([sys.executable, "-m", "training.export", str(step), str(tmp_path / "hf")], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)
    err = [ln for ln in ex.stderr.splitlines() if ln.startswith(("export error", "error"))]
    assert ex.returncode != 0 and len(err) == 1 and "refused to load" in err[0] and "Traceback" not in ex.stderr
    assert not marker.exists()
    rs = subprocess.run([sys.executable, "-m", "training.train", *over, "train.steps=2", "train.extend_schedule=true"],
                        cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
    err = [ln for ln in rs.stderr.splitlines() if ln.startswith("error:")]
    assert rs.returncode == 1 and len(err) == 1 and "refused to load" in err[0], rs.stderr[-3000:]
    assert "Traceback" not in rs.stderr and not marker.exists()


@pytest.mark.slow
def test_sigkill_of_mlcd_group_takes_workers_down(tmp_path):
    """torchrun starts workers in their own sessions; `kill -9 -PGID` of `mlcd train --nproc 2`
    used to leave them running. Now they get SIGTERM when their agent dies, and a rerun on the
    folder takes over the stale lock."""
    import json
    import signal
    import subprocess
    import sys
    import time
    over = _train_inputs(tmp_path) + ["train.steps=100000", "train.checkpoint.every=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--nproc", "2", *over], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    lock = tmp_path / "run/train/.mlcd.lock"
    try:
        for _ in range(240):
            if lock.is_file() and lock.read_text():
                break
            time.sleep(0.5)
        worker = json.loads(lock.read_text())["pid"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(40):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail(f"rank 0 (pid {worker}) outlived its killed agent")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    from pipeline.core import lock as L
    with L.folder_lock(tmp_path / "run/train", "rerun"):  # stale (dead pid): taken over
        pass


def test_training_input_shard_with_labels_must_exist(tmp_path):
    from pipeline.core.config import load_config
    from pipeline.core.dist import DistContext
    from training.train import TrainConfig
    from training.validate import TrainInputError, check_inputs
    over = _train_inputs(tmp_path)
    lst = tmp_path / "list.txt"
    data = tmp_path / "syn/data/train"
    lst.write_text(f"{data}/00000.tar\n{data}/00001.tar\n")
    cfg = load_config(None, [*over, f"train.data.shards={lst}"], "train", TrainConfig)[1]
    check_inputs(cfg, DistContext())
    (data / "00001.tar").unlink()
    with pytest.raises(TrainInputError, match=r"00001.tar: shard not found, but it has labels .*labels_1.npy"):
        check_inputs(cfg, DistContext())
