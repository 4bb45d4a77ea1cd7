"""Hostile and broken weights files, one table: every reader (train.init_from, init_centers_from,
mlcd export, eval's checkpoint/hf models, a resume on every rank) answers with one line naming
the file and the reason, exit code 1 (a bad input file; 2 stays for bad config/arguments), no
traceback, and a pickled payload never runs (its marker file never appears). Also: a torn
metrics.jsonl line on resume, and a full disk (a real 64 KiB tmpfs) during a stage."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from pipeline.core.config import ConfigError
from pipeline.core.dist import DistContext
from pipeline.core.errors import StageError
from training.hf import save_hf_folder
from training.model import ModelConfig, build_model
from training.safe_load import UnsafeCheckpoint, WeightsError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
CFG = ModelConfig(name="vit_tiny_clip", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                  mlp_dim=64, embed_dim=16)
K, W = 10, 2  # classes and ranks of the hand-made checkpoint


class Payload:
    """Unpickling this runs `touch <marker>` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- genuine sources

def hf_folder(root: Path) -> Path:
    torch.manual_seed(0)
    return save_hf_folder(build_model(CFG), CFG, root / "hf")


def step_folder(root: Path) -> Path:
    """A complete ZeRO-0 training checkpoint in our layout (what export/eval/init_from read)."""
    step = root / "run" / "checkpoints" / "step_00000001"
    (step / "partial_fc").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"module": build_model(CFG).state_dict()}, step / "mp_rank_00_model_states.pt")
    for r in range(W):
        s, e = r * K // W, (r + 1) * K // W
        meta = {"start": str(s), "end": str(e), "num_classes": str(K), "rank": str(r), "world_size": str(W)}
        (step / "partial_fc" / f"rank{r}_of{W}.safetensors").write_bytes(
            st_save({"weight": torch.randn(e - s, CFG.embed_dim), "rng.torch": torch.get_rng_state()}, meta))
    state = {"step": 1, "samples_seen": 8, "world_size": W, "zero_stage": 0, "num_classes": K,
             "model_config": dataclasses.asdict(CFG.resolved()), "complete": True}
    (step / "trainer_state.json").write_text(json.dumps(state))
    (step.parent / "latest").write_text(step.name + "\n")
    return step


# ---------------------------------------------------------------- the hostile files

def pickled_pt(root: Path, marker: Path) -> Path:
    torch.save({"vision_model.x": Payload(marker)}, root / "evil.pt")
    return root / "evil.pt"


def raw_pickle_bin(root: Path, marker: Path) -> Path:
    (root / "evil.bin").write_bytes(pickle.dumps({"w": Payload(marker)}))
    return root / "evil.bin"


def bad_header(root: Path, marker: Path) -> Path:  # claims a 2**60-byte header
    (root / "bad.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    return root / "bad.safetensors"


def garbage_header(root: Path, marker: Path) -> Path:  # a header that is not JSON
    (root / "junk.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json" + b"\0" * 16)
    return root / "junk.safetensors"


def truncated(root: Path, marker: Path) -> Path:
    torch.manual_seed(0)
    save_file(build_model(CFG).state_dict(), str(root / "cut.safetensors"))
    data = (root / "cut.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return root / "cut.safetensors"


def hf_pickled_bin(root: Path, marker: Path) -> Path:
    hf = hf_folder(root)
    (hf / "model.safetensors").unlink()
    torch.save({"vision_model.post_layernorm.weight": Payload(marker)}, hf / "pytorch_model.bin")
    return hf


def _index(root: Path, target: str) -> Path:
    hf = hf_folder(root)
    outside = root / "outside.safetensors"
    (hf / "model.safetensors").rename(outside)  # a genuine file, one folder up
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
    return hf


def index_dotdot(root: Path, marker: Path) -> Path:
    return _index(root, "../outside.safetensors")


def index_absolute(root: Path, marker: Path) -> Path:
    return _index(root, str(root / "outside.safetensors"))


def ckpt_pickled(root: Path, marker: Path) -> Path:
    step = step_folder(root)
    torch.save({"module": Payload(marker)}, step / "mp_rank_00_model_states.pt")
    return step


def ckpt_truncated(root: Path, marker: Path) -> Path:
    step = step_folder(root)
    f = step / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:300])
    return step


def ckpt_torn_state(root: Path, marker: Path) -> Path:
    step = step_folder(root)
    (step / "trainer_state.json").write_text('{"step": 1, "compl')
    return step


def centers_shifted(root: Path, marker: Path) -> Path:
    """rank 1's block says [6, 11) instead of [5, 10): centers would land on the wrong classes."""
    step = step_folder(root)
    meta = {"start": "6", "end": "11", "num_classes": str(K), "rank": "1", "world_size": str(W)}
    (step / "partial_fc" / "rank1_of2.safetensors").write_bytes(st_save({"weight": torch.randn(5, 16)}, meta))
    return step


def centers_bad_header(root: Path, marker: Path) -> Path:
    step = step_folder(root)
    (step / "partial_fc" / "rank0_of2.safetensors").write_bytes(struct.pack("<Q", 2**60))
    return step


# ---------------------------------------------------------------- the readers

def init_from(path: Path, tmp: Path) -> None:
    from training.init_weights import load_initial_weights
    from training.train import TrainConfig
    load_initial_weights(build_model(CFG), TrainConfig(init_from=str(path), model=CFG), K, DistContext(), tmp)


def init_centers_from(path: Path, tmp: Path) -> None:
    from training.init_weights import load_initial_weights
    from training.train import TrainConfig
    load_initial_weights(build_model(CFG), TrainConfig(init_centers_from=str(path), model=CFG), K,
                         DistContext(), tmp)


def export(path: Path, tmp: Path) -> None:
    from training.export import export as run
    run(path, tmp / "out", model=CFG.name if path.is_file() else None)


def eval_model(path: Path, tmp: Path) -> None:
    from training.evaluation.evaluate import ModelSpec
    from training.evaluation.features import build_extractor
    kind = "hf" if (path / "config.json").is_file() else "checkpoint"
    model = {f: getattr(CFG, f) for f in ("name", "image_size", "patch_size", "width", "layers", "heads",
                                          "mlp_dim", "embed_dim")} if path.is_file() else {}
    build_extractor(ModelSpec(name="m", kind=kind, path=str(path), model=model), torch.device("cpu"))


def resume_centers(path: Path, tmp: Path) -> None:
    """What a resume reads of the centers (before DeepSpeed's loader runs): check_resume."""
    from training.checkpoint import check_resume
    check_resume(path, 0, False, [(W, K, CFG.embed_dim, "partial_fc")])


FILE_READERS = [init_from, export, eval_model]
CASES = [  # (hostile file, readers, the reason its one line gives)
    (pickled_pt, FILE_READERS, r"refused to load the pickled global (posix|os)\.system"),
    (raw_pickle_bin, [init_from, export], r"refused to load"),
    (bad_header, FILE_READERS, r"bad\.safetensors: unreadable \(SafetensorError"),
    (garbage_header, FILE_READERS, r"junk\.safetensors: unreadable \(SafetensorError"),
    (truncated, FILE_READERS, r"cut\.safetensors: unreadable"),
    (hf_pickled_bin, [init_from, eval_model], r"pytorch_model\.bin: refused to load the pickled global"),
    (index_dotdot, [init_from, eval_model], r"index\.json: refused entry '\.\./outside\.safetensors'"),
    (index_absolute, [init_from, eval_model], r"index\.json: refused entry '/.*outside\.safetensors'"),
    (ckpt_pickled, [init_from, export, eval_model], r"refused to load the pickled global (posix|os)\.system"),
    (ckpt_truncated, [init_from, export, eval_model], r"mp_rank_00_model_states\.pt.*unreadable"),
    (ckpt_torn_state, [init_from, export, eval_model], r"trainer_state\.json: unreadable"),
    (centers_shifted, [init_centers_from, resume_centers],
     r"rank1_of2\.safetensors: holds classes \[6, 11\); the shards must tile \[0, 10\) in rank order, "
     r"this one must start at 5"),
    (centers_bad_header, [init_centers_from, resume_centers], r"rank0_of2\.safetensors: unreadable"),
]


@pytest.mark.parametrize("make,readers,reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_hostile_file_is_one_line(tmp_path, make, readers, reason):
    """Each reader raises a WeightsError (exit 1) naming the file and the reason, with a one-line
    message; the payload never runs."""
    marker = tmp_path / "pwned"
    path = make(tmp_path, marker)
    for read in readers:
        with pytest.raises(StageError) as e:
            read(path, tmp_path)
        assert isinstance(e.value, WeightsError), (read.__name__, type(e.value), e.value)
        msg = str(e.value)
        assert e.value.exit_code == 1 and "\n" not in msg, (read.__name__, msg)
        assert __import__("re").search(reason, msg), (read.__name__, msg)
        assert not marker.exists()
    if "pickle" in make.__name__:
        assert isinstance(e.value, UnsafeCheckpoint)


def test_index_escape_is_refused_before_reading(tmp_path):
    """The entry is refused by its name: the file it names is never opened (a FIFO there would
    block any reader forever)."""
    hf = hf_folder(tmp_path)
    os.mkfifo(tmp_path / "fifo.safetensors")
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../fifo.safetensors"}}))
    from training.safe_load import read_hf_weights
    with pytest.raises(UnsafeCheckpoint, match=r"refused entry '\.\./fifo\.safetensors'.*points outside"):
        read_hf_weights(hf)


def test_genuine_sources_still_load(tmp_path):
    """The table's readers accept the genuine files the hostile ones were made from."""
    hf, step = hf_folder(tmp_path), step_folder(tmp_path)
    for read, path in [(init_from, hf), (init_from, step), (export, step), (eval_model, hf), (eval_model, step),
                       (init_centers_from, step), (resume_centers, step)]:
        read(path, tmp_path)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bad_config_stays_exit_2(tmp_path):
    """A source of another architecture is a config error (exit 2), not a bad file."""
    with pytest.raises(ConfigError, match=r"source width=32 but train.model.width=64"):
        from training.init_weights import load_initial_weights
        from training.train import TrainConfig
        load_initial_weights(build_model(dataclasses.replace(CFG, width=64)),
                             TrainConfig(init_from=str(hf_folder(tmp_path)), model=dataclasses.replace(CFG, width=64)),
                             K, DistContext(), tmp_path)


def _one_line(p: subprocess.CompletedProcess, code: int, text: str) -> None:
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith(("error:", "config error:", "export error:"))]
    assert p.returncode == code and len(errs) == 1 and text in errs[0], (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def test_export_cli_pickled_file_one_line(tmp_path):
    """`mlcd export` (python -m training.export) of a pickled .pt: one line, exit 1."""
    marker = tmp_path / "pwned"
    p = subprocess.run([sys.executable, "-m", "training.export", str(pickled_pt(tmp_path, marker)),
                        str(tmp_path / "out"), "--model", CFG.name], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    _one_line(p, 1, "evil.pt: refused to load the pickled global")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- torn metrics line

def test_torn_metrics_lines_are_dropped(tmp_path, caplog):
    from training.trainer import _kept_metrics
    lines = ['{"step": 1, "loss": 2.0}', '{"step": 2, "lo', '{"step": 3, "loss": 1.5}', '[1]',
             '{"step": 4, "loss": 1.0}', '{"step": 5, "loss"']
    with caplog.at_level("WARNING"):
        kept = _kept_metrics(tmp_path / "metrics.jsonl", lines, 3)
    assert kept == [lines[0], lines[2]]  # step 4 was logged after the checkpoint at 3
    assert "line 6 of 6 is not a metrics record (a torn last write?)" in caplog.text
    assert "line 2 of 6 is not a metrics record (a damaged write?)" in caplog.text
    assert "line 4 of 6" in caplog.text


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount; skipped where the sandbox has neither)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()[:200]}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_export_is_one_line(tmp_path, small_disk, capsys):
    """A 1.1 MB export into a 64 KiB filesystem: one line naming the file, exit 1; a file written
    before is intact and no temp file is left behind."""
    step = step_folder(tmp_path)
    out = small_disk / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output\n")
    big = dataclasses.replace(CFG, width=128, mlp_dim=512, heads=4, layers=2)
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps({**state, "model_config": dataclasses.asdict(big.resolved())}))
    torch.save({"module": build_model(big).state_dict()}, step / "mp_rank_00_model_states.pt")
    from training.export import main as export_main
    code = export_main([str(step), str(out)])  # in-process: a traceback would fail the test
    p = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
    _one_line(p, 1, "no space left on device")
    assert "model.safetensors" in p.stderr
    assert (out / "keep.txt").read_text() == "earlier output\n"
    assert not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()


def test_disk_full_stage_is_one_line(tmp_path, small_disk, capsys):
    """A stage through the shared entry path (k-means: centroids of 512 x 64 floats = 128 KiB)
    whose output folder is a 64 KiB filesystem: one line, exit 1, no traceback, no temp file."""
    from test_reliability import clip_retrieval_store
    clip_retrieval_store(tmp_path / "store", n_parts=2, rows=600, d=64, k=8)
    from pipeline.core.entry import stage_cli
    with pytest.raises(SystemExit) as e:  # in-process: a traceback would fail the test
        stage_cli("cluster", [f"run.out_dir={small_disk}", f"cluster.store={tmp_path / 'store'}", "cluster.kind=img",
             "cluster.k=512", "cluster.niter=1", "cluster.points_per_centroid=1"])
    _one_line(subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err), 1,
              ".npy: no space left on device")  # the first array that does not fit
    assert not list((small_disk / "clusters").glob(".*.tmp"))


# ---------------------------------------------------------------- 2 ranks: a resume is agreed

@pytest.mark.slow
def test_two_rank_resume_with_one_bad_rank_file(tmp_path):
    """`mlcd train --nproc 2` resuming a ZeRO-1 checkpoint whose rank-1 optimizer file is a
    pickle payload (only rank 1 reads it): both ranks stop with the same one line (printed once,
    by rank 0), exit 1, no traceback on either rank or the agent, no marker. With the genuine file
    back and a torn last metrics line, the same command resumes and finishes."""
    import shutil

    from test_reliability import _train_inputs
    over = _train_inputs(tmp_path) + ["train.deepspeed.zero_stage=1", "train.checkpoint.every=1"]
    mlcd = [sys.executable, "-m", "launch.cli", "train", "--nproc", "2", *over]
    p = subprocess.run(mlcd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    step = tmp_path / "run/train/checkpoints/step_00000001"
    bad = next(step.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    shutil.copy(bad, tmp_path / "genuine.pt")
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, bad)
    p = subprocess.run([*mlcd, "train.steps=2", "train.extend_schedule=true"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=400)
    _one_line(p, 1, f"{bad}: refused to load the pickled global")
    assert not marker.exists() and not (step.parent / "step_00000002").exists()
    shutil.copy(tmp_path / "genuine.pt", bad)
    metrics = tmp_path / "run/train/metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 2, "loss": 1.')  # a write torn by a kill
    p = subprocess.run([*mlcd, "train.steps=2", "train.extend_schedule=true"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "not a metrics record (a torn last write?)" in p.stderr + p.stdout
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_two_rank_eval_of_pickled_hf_folder(tmp_path):
    """`mlcd eval --nproc 2` of a HF folder whose only weights are a pickled pytorch_model.bin:
    every rank builds the model, the file is refused on both, one line (rank 0's), exit 1."""
    from test_eval import _eval_config, _write_probe_shards
    for split, n in (("train", 12), ("test", 6)):
        _write_probe_shards(tmp_path / "colours" / split, n, ["red", "green", "blue"], 0)
    marker = tmp_path / "pwned"
    hf = hf_pickled_bin(tmp_path, marker)
    cfg = _eval_config(tmp_path, tmp_path / "colours", "")
    cfg.write_text(cfg.read_text().replace("{name: tiny, kind: random, model: {name: vit_tiny_clip, image_size: 32}, "
                                           "seed: 1}", f"{{name: evil, kind: hf, path: {hf}}}"))
    assert str(hf) in cfg.read_text()
    p = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "--nproc", "2", "--config", str(cfg)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    _one_line(p, 1, "pytorch_model.bin: refused to load the pickled global")
    assert not marker.exists()
