"""Stage 1b (pipeline.regions) and the RICE scenes (pipeline.demo.rice_data): box file source with the
min-edge rule and skip counts, the components source on composed scenes, Tesseract on rendered
words, the store layout as pipeline/core/store.py reads it, resume per part, one-line bad settings.

Scenes come from `mlcd data rice` at a tiny size (real openclipart drawings and Noto fonts from
the Debian packages of `make apt`); the encoder is a tiny random-init open_clip model.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import regions as R
from pipeline.core.shards import ShardWriter, encode_image
from pipeline.core.store import EmbeddingStore, read_keys
from pipeline.demo import rice_data as RD
from tests.conftest import ROOT
from tests.test_embed import TINY_CLIP

HAS_TESSERACT = shutil.which("tesseract") is not None
needs_tesseract = pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract binary absent (make apt)")


def tiny_encoder(tmp: Path) -> list[str]:
    cfg = tmp / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    return ["regions.encoder.kind=open_clip", f"regions.encoder.model_config={cfg}",
            "regions.encoder.pretrained=null", "regions.batch_size=16", "regions.workers=0"]


def run_regions(tmp: Path, *overrides: str) -> dict:
    return R.main(None, [f"run.out_dir={tmp / 'run'}", *tiny_encoder(tmp), *overrides])


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def rice(tmp_path_factory):
    """A tiny `mlcd data rice` build: 2 pool shards of 6 scenes, probe 12 + 12 scenes."""
    out = tmp_path_factory.mktemp("rice")
    summary = RD.main(None, [f"run.out_dir={out}", "data.samples_per_shard=6", "data.workers=1",
                             "data.rice.pool_scenes=12", "data.rice.probe_train=12", "data.rice.probe_test=12"])
    return out, out / "data" / "rice", summary


def test_scenes_and_box_files(rice):
    _, root, summary = rice
    assert summary["train"]["shards"] == 2 and summary["probe/test"]["scenes"] == 12
    boxes = pq.read_table(root / "boxes" / "00000.parquet").to_pylist()
    assert len(boxes) == 6 and all(set(r["kind"]) == {"object"} for r in boxes)  # words: left to OCR
    gt = pq.read_table(root / "probe" / "test" / "gt_00000.parquet").to_pylist()
    classes = json.loads((root / "classes.json").read_text())
    for r in gt:
        assert r["kind"].count("ocr") >= 1 and r["kind"].count("object") >= 1
        for box, kind, label in zip(r["boxes"], r["kind"], r["label"]):
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 128
            assert label in (classes["words"] if kind == "ocr" else classes["objects"])
    # deterministic: scene i of a split is the same picture when composed again
    cfg = RD.RiceConfig()
    cats, pools = RD.clipart_pools(cfg, "/usr/share/openclipart/png")
    data, *_ = RD.compose(cfg, cats, pools["probe/test"], 0, "probe/test", 3)
    assert _samples(root / "probe" / "test" / "00000.tar")[3]["png"] == data


def _samples(tar: Path) -> list[dict]:
    return list(R.read_samples(str(tar)))


def _boxed_shard(tmp: Path) -> None:
    """3 images (64 x 48) and a box file with one box of each skip reason."""
    w = ShardWriter(tmp / "shards", 0)
    for i in range(3):
        a = np.full((48, 64, 3), 255, np.uint8)
        a[4:30, 4:30] = (200, 30, 30)
        data, ext = encode_image(Image.fromarray(a), "png")
        w.write(f"img{i}", data, ext, f"image {i}", {})
    w.close()
    rows = [("img0", [[4, 4, 30, 30], [0, 0, 5, 40], [10, 10, 5, 20], [100, 100, 120, 120], [1, 1, 20, 20]],
             ["object", "object", "object", "object", "bogus"], ["", "", "", "", ""]),
            ("img1", [[40.4, 30, 80, 60], [2, 2, 40, 20], [2, 22, 40, 40]], ["object", "ocr", "ocr"],
             ["", "", "hello!"])]  # img2: no row
    (tmp / "boxes").mkdir()
    pq.write_table(pa.table({"key": [r[0] for r in rows], "boxes": [r[1] for r in rows],
                             "kind": [r[2] for r in rows], "text": [r[3] for r in rows]}),
                   tmp / "boxes" / "00000.parquet")


def test_box_file_min_edge_and_skip_counts(tmp_path):
    _boxed_shard(tmp_path)
    store = tmp_path / "store"
    run_regions(tmp_path, f"regions.input={tmp_path / 'shards'}", f"regions.out_dir={store}",
                f"regions.boxes_dir={tmp_path / 'boxes'}", "regions.ocr=none", "regions.min_edge=8")
    meta = pq.read_table(store / "metadata" / "metadata_0.parquet").to_pylist()
    got = [(m["key"], m["image_key"], m["kind"], m["text"], m["source"], m["x0"], m["y0"], m["x1"], m["y1"])
           for m in meta]
    assert got == [("img0.r0", "img0", "object", "", "file", 4, 4, 30, 30),
                   ("img1.r0", "img1", "object", "", "file", 40, 30, 64, 48),  # clipped, floor/ceil
                   ("img1.r1", "img1", "ocr", "hello", "file", 2, 22, 40, 40)]
    assert all((m["img_w"], m["img_h"]) == (64, 48) for m in meta)
    stats = json.loads((store / "stats.json").read_text())
    assert stats["kept"] == {"object": 2, "ocr": 1}
    assert stats["skipped"] == {"bad_kind": 1, "degenerate": 1, "empty_text": 1, "out_of_image": 1, "too_small": 1}
    assert stats["images"] == 3 and stats["images_without_boxes"] == 1 and stats["complete"]


def test_components_find_composed_objects(rice):
    """The drawings and words of the probe scenes are found as components (IoU >= 0.7 with the
    composed box; a drawing in pieces further apart than `close` px is the documented miss)."""
    _, root, _ = rice
    gt = {r["key"]: r for r in pq.read_table(root / "probe" / "test" / "gt_00000.parquet").to_pylist()}
    found = total = 0
    for s in _samples(root / "probe" / "test" / "00000.tar"):
        rgb = np.asarray(R.load_rgb(s["png"])[0])
        comps = R.components(rgb, threshold=32, close=2)
        for box in gt[s["__key__"]]["boxes"]:
            total += 1
            found += max((iou(box, c) for c in comps), default=0) >= 0.7
    assert total >= 12 and found / total >= 0.8, (found, total)


@needs_tesseract
def test_tesseract_reads_a_rendered_word():
    cfg = RD.RiceConfig()
    im = Image.new("RGBA", (128, 128), (240, 235, 250, 255))
    word = RD._word("garden", cfg.fonts[1], 24, (20, 40, 30))
    im.alpha_composite(word, (20, 50))
    truth = [20, 50, 20 + word.width, 50 + word.height]
    words = R.tesseract_words([im.convert("RGB")], R.RegionsConfig(encoder=R.EncoderConfig(kind="offline")))
    hits = [(b, t, c) for b, t, c in words[0] if R.clean_word(t) == "garden"]
    assert hits and iou(hits[0][0], truth) > 0.6 and hits[0][2] >= 70, words


@needs_tesseract
def test_store_layout_ocr_and_resume(rice, tmp_path):
    """The pool through file boxes + Tesseract: a store pipeline/core/store.py reads, row-aligned;
    words read back; deleting one part and rerunning rewrites only that part, identically."""
    _, root, _ = rice
    store = tmp_path / "store"
    args = [f"regions.input={root / 'train'}", f"regions.boxes_dir={root / 'boxes'}", f"regions.out_dir={store}"]
    run_regions(tmp_path, *args)
    st = EmbeddingStore(store)
    parts, dim, _, counts = st.check("img")
    assert parts == [0, 1] and dim == TINY_CLIP["embed_dim"]
    words = {r["key"]: r for r in pq.read_table(root / "train" / "00000.parquet").to_pylist()}
    for p, n in zip(parts, counts):
        meta = st.metadata(p).to_pylist()
        assert len(meta) == n == len(read_keys(store / "metadata" / f"metadata_{p}.parquet"))
        emb = np.asarray(st.load("img", p), np.float32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
        assert [m["key"] for m in meta] == [f"{m['image_key']}.r{j}" for m, j in zip(meta, _ranks(meta))]
    ocr = [m for m in st.metadata(0).to_pylist() if m["kind"] == "ocr"]
    truth = sum(len(w["words"]) for w in words.values())
    read = sum(m["text"].lower() in words[m["image_key"]]["words"] for m in ocr)
    assert read >= truth // 2, (read, truth, [m["text"] for m in ocr])

    before = {p: (store / "img_emb" / f"img_emb_{p}.npy").stat().st_mtime_ns for p in parts}
    ref = np.asarray(st.load("img", 1)).copy()
    (store / "metadata" / "metadata_1.parquet").unlink()
    out = run_regions(tmp_path, *args)
    assert out["parts_written"] == 1
    assert (store / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == before[0]
    assert (store / "img_emb" / "img_emb_1.npy").stat().st_mtime_ns != before[1]
    np.testing.assert_array_equal(np.asarray(EmbeddingStore(store).load("img", 1)), ref)


def _ranks(meta):
    """j of each row: its index among its image's rows."""
    seen = {}
    for m in meta:
        seen[m["image_key"]] = seen.get(m["image_key"], -1) + 1
        yield seen[m["image_key"]]


def _cli(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.regions", f"run.out_dir={tmp}", *args],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def test_bad_settings_fail_in_one_line(rice, tmp_path):
    _, root, _ = rice
    p = _cli(tmp_path, "regions.boxes=detector")
    assert p.returncode == 2 and "regions.boxes='detector'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli(tmp_path, f"regions.input={root / 'train'}", f"regions.boxes_dir={tmp_path}", "regions.ocr=none")
    assert p.returncode == 2 and "regions.boxes_dir=" in p.stderr and "00000.parquet" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # no tesseract on the PATH: named by its setting before any model is built
    p = _cli(tmp_path, f"regions.input={root / 'train'}", f"regions.boxes_dir={root / 'boxes'}",
             env={"PATH": str(Path(sys.executable).parent)})
    assert p.returncode == 2 and "regions.ocr='tesseract'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_ranks_equal_one_rank(rice, tmp_path):
    """Ranks split the parts (as stage 1): 2 ranks under torchrun write the 1-rank store (here
    with the components source through the whole stage)."""
    from tests.conftest import torchrun
    _, root, _ = rice
    args = [f"regions.input={root / 'train'}", "regions.boxes=components", "regions.ocr=none"]
    run_regions(tmp_path, *args, f"regions.out_dir={tmp_path / 'one'}")
    torchrun(["-m", "pipeline.regions", f"run.out_dir={tmp_path / 'run2'}", *tiny_encoder(tmp_path), *args,
              f"regions.out_dir={tmp_path / 'two'}"], nproc=2)
    one, two = EmbeddingStore(tmp_path / "one"), EmbeddingStore(tmp_path / "two")
    assert one.parts("img") == two.parts("img") == [0, 1]
    for p in (0, 1):
        assert one.metadata(p).equals(two.metadata(p))
        np.testing.assert_array_equal(np.asarray(one.load("img", p)), np.asarray(two.load("img", p)))
    s1, s2 = (json.loads((s.root / "stats.json").read_text()) for s in (one, two))
    assert s1["kept"] == s2["kept"] and s1["skipped"] == s2["skipped"] and s2["complete"]
    assert s1["kept"]["object"] >= 12 and set(one.metadata(0).column("source").to_pylist()) == {"components"}
