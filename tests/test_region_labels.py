"""Region labels (RICE): object rows carry assign's cluster ids, OCR rows K + the CLIP BPE ids of
their text, the label space file, resume, and one-line errors on bad input. The region store is
written here in the layout of the spec (pipeline.core.store writers), labelled by the real assign."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT

from pipeline.core.config import ConfigError
from pipeline.core.io import atomic_save_npy, load_npy
from pipeline.core.store import StoreError, write_part

K, D = 6, 8
# (kind, text) per region; part 0 then part 1
REGIONS = [
    [("object", ""), ("ocr", "hello world"), ("object", ""), ("ocr", "go go stop STOP"),
     ("ocr", "")],
    [("ocr", "the quick brown fox jumps over"), ("object", ""), ("object", ""), ("ocr", "hello")],
]
HELLO, WORLD = 3306, 1002  # CLIP BPE ids of "hello</w>" and "world</w>"
FULL = "region_labels.compact_tokens=false"  # token class = CLIP id (49,408 classes)


def _metadata(part: int, rows: list[tuple[str, str]]) -> pa.Table:
    n = len(rows)
    img = [f"{part:05d}{j // 2:04d}" for j in range(n)]
    return pa.table({
        "key": [f"{img[j]}.r{j}" for j in range(n)], "image_key": img,
        "x0": [0] * n, "y0": [0] * n, "x1": [16] * n, "y1": [16] * n, "img_w": [64] * n, "img_h": [64] * n,
        "kind": [k for k, _ in rows], "text": [t for _, t in rows], "source": ["test"] * n})


@pytest.fixture()
def run_dir(tmp_path):
    """runs/x/regions/{store, clusters/centroids.npy, clusters/labels (assign, l=3)}."""
    from clustering import assign
    rng = np.random.default_rng(0)
    root = tmp_path / "run"
    c = rng.normal(size=(K, D)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    atomic_save_npy(root / "regions/clusters/centroids.npy", c)
    for p, rows in enumerate(REGIONS):
        x = rng.normal(size=(len(rows), D)).astype(np.float32)
        write_part(root / "regions/store", p, {"img": x / np.linalg.norm(x, axis=1, keepdims=True)},
                   _metadata(p, rows))
    assign.main(None, [f"run.out_dir={root}", "assign.store=${run.out_dir}/regions/store", "assign.kind=img",
                       "assign.centroids=${run.out_dir}/regions/clusters/centroids.npy",
                       "assign.out_dir=${run.out_dir}/regions/clusters/labels", "assign.l=3",
                       "assign.report=false"])
    return root


def _run(root, *over):
    from clustering import region_labels
    return region_labels.main(None, [f"run.out_dir={root}", *over])


def _expected_tokens(text: str, n: int) -> list[int]:
    from open_clip.tokenizer import SimpleTokenizer
    return list(dict.fromkeys(SimpleTokenizer().encode(text)))[:n]


def test_label_store_content_and_label_space(run_dir):
    space = _run(run_dir, FULL, "region_labels.width=5", "region_labels.max_tokens=4")
    out = run_dir / "regions/labels"
    for p, rows in enumerate(REGIONS):
        lab = load_npy(out / f"labels_{p}.npy")
        assigned = load_npy(run_dir / f"regions/clusters/labels/labels_{p}.npy")
        assert lab.dtype == np.int64 and lab.shape == (len(rows), 5)
        for r, (kind, text) in enumerate(rows):
            if kind == "object":  # top-3 cluster ids, nearest first, then padding
                assert lab[r, :3].tolist() == assigned[r].tolist() and (lab[r, 3:] == -1).all()
                assert (0 <= lab[r, :3]).all() and (lab[r, :3] < K).all()
            else:
                ids = _expected_tokens(text, 4)
                assert lab[r].tolist() == [K + t for t in ids] + [-1] * (5 - len(ids)), text
    lab0 = load_npy(out / "labels_0.npy")
    assert lab0[1].tolist() == [K + HELLO, K + WORLD, -1, -1, -1]
    # "go go stop STOP": lower-cased BPE, repeats dropped -> 2 distinct tokens
    assert (lab0[3] >= K).sum() == 2 and len(set(lab0[3, :2].tolist())) == 2
    assert (lab0[4] == -1).all()  # empty OCR text: no usable label
    assert (load_npy(out / "labels_1.npy")[0] >= K).sum() == 4  # six words, first 4 kept
    js = json.loads((out / "label_space.json").read_text())
    assert js == space and js["clusters"] == K and js["tokens"] == 49408
    assert js["num_classes"] == K + 49408 and js["width"] == 5
    assert js["counts"] == {"regions": 9, "object": 4, "ocr": 5, "object_labeled": 4, "ocr_labeled": 4,
                            "unlabeled": 1, "token_labels": 2 + 2 + 4 + 1}


def test_resume_skips_finished_parts_and_settings_change_relabels(run_dir):
    out = run_dir / "regions/labels"
    _run(run_dir, FULL)
    m0, m1 = ((out / f"labels_{p}.npy").stat().st_mtime_ns for p in (0, 1))
    first = load_npy(out / "labels_1.npy")
    # a kill after part 0: part 1 and the completion marker missing -> only part 1 is redone
    (out / "labels_1.npy").unlink()
    (out / "label_space.json").unlink()
    _run(run_dir, FULL)
    assert (out / "labels_0.npy").stat().st_mtime_ns == m0
    assert (out / "labels_1.npy").stat().st_mtime_ns != m1
    assert np.array_equal(load_npy(out / "labels_1.npy"), first) and (out / "label_space.json").is_file()
    # a different setting: refused without resume/overwrite; with resume every part is relabeled
    with pytest.raises(ConfigError, match="different config"):
        _run(run_dir, FULL, "region_labels.width=2", "region_labels.max_tokens=1")
    _run(run_dir, FULL, "region_labels.width=2", "region_labels.max_tokens=1", "run.resume=true")
    lab = load_npy(out / "labels_0.npy")
    assert lab.shape == (5, 2) and (out / "labels_0.npy").stat().st_mtime_ns != m0
    assert lab[1].tolist() == [K + HELLO, -1]
    assert json.loads((out / "label_space.json").read_text())["width"] == 2
    _run(run_dir, FULL, "region_labels.width=1", "run.resume=true")  # max_tokens 8 > width: width wins
    assert load_npy(out / "labels_0.npy")[1].tolist() == [K + HELLO]
    # OCR labels off: OCR rows unlabeled, the label space is the clusters alone
    _run(run_dir, FULL, "region_labels.ocr=false", "run.overwrite=true")
    js = json.loads((out / "label_space.json").read_text())
    assert js["num_classes"] == K and js["counts"]["ocr_labeled"] == 0
    assert (load_npy(out / "labels_0.npy")[[1, 3, 4]] == -1).all()


def test_compact_token_space_round_trip(run_dir):
    """Default: token classes are only the CLIP ids that occur, remapped to 0..V-1; label_space.json
    records the mapping and training's LabelSpace decodes every label back to its CLIP id."""
    from training.region_data import LabelSpace, region_num_classes
    space = _run(run_dir, "region_labels.width=5", "region_labels.max_tokens=4")
    out = run_dir / "regions/labels"
    occurring = sorted({t for rows in REGIONS for kind, text in rows if kind == "ocr"
                        for t in _expected_tokens(text, 4)})
    assert space["token_ids"] == occurring and space["tokens"] == len(occurring) < 49408
    assert space["num_classes"] == K + len(occurring) == region_num_classes(out)
    ls = LabelSpace.read(out)
    for p, rows in enumerate(REGIONS):
        lab = load_npy(out / f"labels_{p}.npy")
        assert lab.max() < space["num_classes"]
        for r, (kind, text) in enumerate(rows):
            decoded = [ls.decode(int(c)) for c in lab[r] if c >= 0]
            if kind == "ocr":  # round trip: label -> CLIP id, in the text's token order
                assert decoded == [("token", t) for t in _expected_tokens(text, 4)], text
            else:
                assert all(kind == "cluster" and 0 <= c < K for kind, c in decoded)
    # every token class is used by some region (the space holds no never-seen token)
    used = set(np.concatenate([load_npy(out / f"labels_{p}.npy").ravel() for p in range(2)]).tolist())
    assert set(range(K, space["num_classes"])) <= used
    # a label space whose mapping does not add up is refused by the loader
    bad = dict(space, token_ids=occurring[:-1])
    (out / "label_space.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="token_ids"):
        LabelSpace.read(out)


def _break(root, how):
    lab = root / "regions/clusters/labels/labels_1.npy"
    if how == "rows":
        atomic_save_npy(lab, load_npy(lab)[:-1])
        return lab.name, "not row-aligned"
    if how == "missing":
        lab.unlink()
        return lab.name, "missing labels"
    if how == "range":
        a = load_npy(lab)
        a[0, 0] = K
        atomic_save_npy(lab, a)
        return lab.name, "outside"
    meta = root / "regions/store/metadata/metadata_0.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(meta).drop(["text"]), meta)
    return meta.name, "missing column"


@pytest.mark.parametrize("how", ["rows", "missing", "range", "column"])
def test_bad_input_is_one_line_naming_the_file_before_work(run_dir, how):
    name, why = _break(run_dir, how)
    with pytest.raises(StoreError, match=why) as e:
        _run(run_dir)
    assert name in str(e.value) and "\n" not in str(e.value)
    assert not (run_dir / "regions/labels").exists()  # nothing written


def test_cli_prints_one_line_and_exits_1(run_dir):
    _break(run_dir, "range")
    p = subprocess.run([sys.executable, "-m", "clustering.region_labels", f"run.out_dir={run_dir}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "labels_1.npy" in lines[0], p.stderr


@pytest.mark.slow
def test_two_ranks_write_what_one_rank_writes(run_dir):
    """Ranks split the parts; the files and label_space.json equal a 1-rank run's."""
    from conftest import torchrun
    torchrun(["-m", "clustering.region_labels", f"run.out_dir={run_dir}",
              "region_labels.out_dir=${run.out_dir}/two"], 2, timeout=300)
    _run(run_dir, "region_labels.out_dir=${run.out_dir}/one")
    for p in range(len(REGIONS)):
        assert np.array_equal(load_npy(run_dir / f"one/labels_{p}.npy"), load_npy(run_dir / f"two/labels_{p}.npy"))
    one, two = (json.loads((run_dir / f"{d}/label_space.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in one.items() if k != "wall_s"} == {k: v for k, v in two.items() if k != "wall_s"}
