"""Stage 1 (pipeline.embed): store layout, resume after SIGKILL, 2 ranks == 1 rank, bad samples.

Shards are built here (tiny synthetic JPEGs), so nothing depends on the demo data. Multi-process
runs use a tiny random-init open_clip model (seeded, so every process builds the same weights);
the in-process layout test uses configs/debug.yaml's offline encoder (EfficientNet-Lite0 + MiniLM).
"""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import embed as E
from pipeline.core.entry import stage_cli
from pipeline.core.store import EmbeddingStore, StoreError
from tests.conftest import ROOT, torchrun

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def synth(i: int) -> tuple[bytes, str]:
    rng = np.random.default_rng(i)
    name, rgb = list(COLORS.items())[i % len(COLORS)]
    a = np.full((40, 48, 3), 255, np.uint8)
    y, x = rng.integers(0, 20, 2)
    a[y:y + 20, x:x + 24] = rgb
    a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    return jpeg(Image.fromarray(a)), f"a {name} box number {i}"


def write_shards(folder: Path, n_shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                data, cap = synth(i)
                w.write({"__key__": f"{s:05d}{j:04d}", "jpg": data, "txt": cap,
                         "json": json.dumps({"url": f"http://x/{i}.jpg", "cls": i % 4}).encode()})
        out.append(str(path))
    return out


def tiny_args(tmp: Path, shards: str, store: Path, *extra) -> list[str]:
    cfg = tmp / "tiny-clip.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(TINY_CLIP))
    return ["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={tmp / 'run'}",
            f"embed.input={shards}", f"embed.out_dir={store}", "embed.encoder.kind=open_clip",
            f"embed.encoder.model_config={cfg}", "embed.encoder.pretrained=null",
            "embed.encoder.image_size=0", "embed.batch_size=8", *extra]


def run_embed(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.embed", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def read_store(root: Path) -> dict:
    st = EmbeddingStore(root)
    out = {}
    for p in st.parts("img"):
        out[p] = {k: np.asarray(st.load(k, p)) for k in st.kinds}
        out[p]["meta"] = st.metadata(p).to_pydict()
    return out


def assert_same_store(a: Path, b: Path, exact: bool = True):
    sa, sb = read_store(a), read_store(b)
    assert sorted(sa) == sorted(sb)
    for p in sa:
        assert sa[p]["meta"]["key"] == sb[p]["meta"]["key"], p
        assert sa[p]["meta"]["shard_row"] == sb[p]["meta"]["shard_row"], p
        for k in ("img", "text", "joint"):
            if exact:
                np.testing.assert_array_equal(sa[p][k], sb[p][k])
            else:
                np.testing.assert_allclose(sa[p][k].astype(np.float32), sb[p][k].astype(np.float32), atol=2e-3)
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    for key in ("parts", "skipped", "fixed", "num_rows", "dims", "complete"):
        assert ma[key] == mb[key], key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 shards x 16 images and a reference 1-rank store from an uninterrupted real process."""
    tmp = tmp_path_factory.mktemp("embed")
    write_shards(tmp / "shards", 12, 16)
    spec = str(tmp / "shards" / "{00000..00011}.tar")
    ref = tmp / "ref"
    p = run_embed(tiny_args(tmp, spec, ref))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return tmp, spec, ref


# ---------------------------------------------------------------- layout, counts, rerun

def test_store_layout_and_counts_offline_encoder(tmp_path):
    write_shards(tmp_path / "shards", 3, 10)
    (tmp_path / "shards" / "list.txt").write_text("\n".join(
        str(tmp_path / "shards" / f"{s:05d}.tar") for s in range(3)) + "\n")
    store = tmp_path / "store"
    ov = [f"run.out_dir={tmp_path}", f"embed.input={tmp_path / 'shards' / 'list.txt'}",
          f"embed.out_dir={store}", "embed.extra_fields=[cls]", "embed.workers=2"]
    s = E.main(str(ROOT / "configs/debug.yaml"), ov)
    assert s["rows"] == 30 and s["parts_written"] == 3 and not s["failures"]
    st = EmbeddingStore(store)
    assert st.kinds == ["img", "text", "joint"]
    for kind, dim in (("img", 1280), ("text", 384), ("joint", 1664)):
        parts, d, dtype, counts = st.check(kind)
        assert (parts, d, dtype, counts) == ([0, 1, 2], dim, np.float16, [10, 10, 10])
        x = np.asarray(st.load(kind, 1), np.float32)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    meta = st.metadata(2).to_pydict()
    assert meta["key"] == [f"00002{j:04d}" for j in range(10)]
    assert meta["shard_row"] == list(range(10)) and meta["cls"] == [(20 + j) % 4 for j in range(10)]
    assert meta["caption"][3] == "a yellow box number 23" and meta["url"][0] == "http://x/20.jpg"
    assert set(meta["shard"]) == {str(tmp_path / "shards" / "00002.tar")}
    # joint = concat of normalized image and text vectors / sqrt(2) (offline towers differ)
    img, txt, jnt = (np.asarray(st.load(k, 0), np.float32) for k in ("img", "text", "joint"))
    np.testing.assert_allclose(jnt, np.concatenate([img, txt], 1) / np.sqrt(2), atol=2e-3)
    # captions carry meaning: same-colour captions are closer than different-colour ones
    t = np.asarray(st.load("text", 0), np.float32)
    assert t[0] @ t[4] > t[0] @ t[1]  # 0,4 red; 1 green
    m = json.loads((store / "manifest.json").read_text())
    assert m["complete"] and m["num_rows"] == 30 and m["dtype"] == "float16"
    assert m["dims"] == {"img": 1280, "text": 384, "joint": 1664}
    assert m["encoder"]["joint"] == "concat" and m["encoder"]["image_size"] == 64
    assert [p["rows"] for p in m["parts"]] == [10, 10, 10] and m["skipped"] == {}
    assert m["config"]["embed"]["encoder"]["kind"] == "offline"
    # a rerun finds every part done and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*.npy")}
    s2 = E.main(str(ROOT / "configs/debug.yaml"), ov)
    assert s2["rows"] == 0 and s2["parts_written"] == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in store.rglob("*.npy")}
    # a different encoder config into the same store is refused (one line, exit code 2 via cli)
    with pytest.raises(E.ConfigError, match="different config"):
        E.main(str(ROOT / "configs/debug.yaml"), ov + ["embed.encoder.image_size=96"])


def test_open_clip_encoder_interface(tmp_path):
    """The interface stage-1 and the eval share: build_encoder + preprocess + encode_*."""
    from pipeline.encoders import EncoderConfig, build_encoder
    (tmp_path / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    cfg = EncoderConfig(kind="open_clip", model_config=str(tmp_path / "tiny-clip.json"), pretrained=None)
    enc = build_encoder(cfg)
    x = enc.preprocess(Image.new("RGB", (50, 30), (200, 10, 10)))
    assert tuple(x.shape) == (3, 32, 32)
    img = enc.encode_images(x[None].repeat(2, 1, 1, 1))
    txt = enc.encode_texts(["a red box", "a blue box", "x"])
    assert img.shape == (2, 16) and txt.shape == (3, 16) and enc.joint_dim == 16
    np.testing.assert_allclose(img.norm(dim=1).numpy(), 1.0, atol=1e-5)
    j = enc.joint(img, txt[:2])  # shared CLIP space: mean of the two, renormalized
    np.testing.assert_allclose(j.numpy(), ((img + txt[:2]) / (img + txt[:2]).norm(dim=1, keepdim=True)).numpy(),
                               atol=1e-6)
    with pytest.raises(E.ConfigError, match="kind"):
        EncoderConfig(kind="nope")


# ---------------------------------------------------------------- distributed and resume

@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny):
    tmp, spec, ref = tiny
    two = tmp / "two"
    torchrun(["-m", "pipeline.embed", *tiny_args(tmp, spec, two, "embed.workers=1")], nproc=2)
    assert_same_store(ref, two)
    m = json.loads((two / "manifest.json").read_text())
    assert m["complete"] and m["num_parts"] == 12 and m["num_rows"] == 12 * 16


@pytest.mark.slow
def test_sigkill_then_resume_gives_same_store(tiny):
    tmp, spec, ref = tiny
    store = tmp / "killed"
    p = run_embed(tiny_args(tmp, spec, store, "embed.workers=1"), start_new_session=True)
    done = lambda: len(list((store / "metadata").glob("metadata_*.parquet"))) if (store / "metadata").is_dir() else 0
    deadline = time.time() + 240
    while done() < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the whole group: DataLoader workers die too
    p.wait()
    n_killed = done()
    assert 2 <= n_killed < 12 and not (store / "manifest.json").exists()
    p = run_embed(tiny_args(tmp, spec, store, "embed.workers=1"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"{n_killed} done, {12 - n_killed} to do" in err
    assert not list(store.rglob(".*.tmp"))
    assert_same_store(ref, store)


# ---------------------------------------------------------------- bad samples and bad shards

def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no data: a decompression bomb."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_corpus(path: Path) -> tuple[int, dict, dict]:
    good, _ = synth(0)
    rgb = Image.new("RGB", (40, 30), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    samples = [
        ("ok", {"jpg": good, "txt": "a fine image"}),
        ("truncated", {"jpg": good[: len(good) // 2], "txt": "cut"}),
        ("zero", {"jpg": b"", "txt": "nothing"}),
        ("text_bytes", {"jpg": b"<html>not an image</html>", "txt": "html"}),
        ("cmyk", {"jpg": jpeg(Image.new("CMYK", (32, 32), (0, 255, 255, 0))), "txt": "cmyk"}),
        ("sixteen", {"png": png(Image.fromarray(np.full((20, 20), 40000, np.uint16))), "txt": "16 bit"}),
        ("palette", {"png": png(pal), "txt": "palette"}),
        ("palette_alpha", {"png": png(pal, transparency=0), "txt": "palette + transparency"}),
        ("rgba", {"png": png(Image.new("RGBA", (20, 20), (0, 0, 0, 0))), "txt": "transparent"}),
        ("gray", {"jpg": jpeg(Image.new("L", (20, 20), 128)), "txt": "gray"}),
        ("rotated", {"jpg": jpeg(Image.new("RGB", (40, 20), (0, 200, 0)), exif=exif), "txt": "exif"}),
        ("bomb", {"png": png_bomb(100_000, 100_000), "txt": "bomb"}),
        ("big", {"jpg": jpeg(Image.new("RGB", (300, 300))), "txt": "over max_pixels"}),
        ("nocap", {"jpg": good}),
        ("emptycap", {"jpg": good, "txt": "   \n"}),
        ("latin1", {"jpg": good, "txt": "caf\xe9 cr\xe8me".encode("latin-1")}),
        ("ok", {"jpg": good, "txt": "same key again"}),
        ("noimage", {"txt": "caption without an image", "json": b"{not json"}),
        ("strip", {"png": png_bomb(1, 40_000), "txt": "1 x 40,000 (< max_pixels): ~6 GB at 224 px"}),
    ]
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    skipped = {"corrupt_image": 1, "duplicate_key": 1, "empty_image": 1, "missing_image": 1,
               "not_an_image": 1, "too_large": 2, "extreme_aspect": 1}
    fixed = {"alpha": 2, "caption_empty": 1, "caption_missing": 1, "caption_not_utf8": 1, "cmyk": 1,
             "exif_rotated": 1, "grayscale": 1, "high_bit_depth": 1, "palette": 2}
    return len(samples), skipped, fixed


def test_repairs_are_correct():
    exif = Image.Exif()
    exif[0x0112] = 6
    im, fixes = E.load_rgb(jpeg(Image.new("RGB", (40, 20), (0, 200, 0)), exif=exif), 10**6)
    assert im.size == (20, 40) and fixes == ["exif_rotated"]
    im, fixes = E.load_rgb(png(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), 10**6)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and fixes == ["alpha"]
    im, fixes = E.load_rgb(png(Image.fromarray(np.full((4, 4), 40000, np.uint16))), 10**6)
    assert fixes == ["high_bit_depth"] and abs(im.getpixel((0, 0))[0] - 40000 / 257) < 1.5
    im, fixes = E.load_rgb(jpeg(Image.new("CMYK", (8, 8), (0, 255, 255, 0))), 10**6)
    r, g, b = im.getpixel((4, 4))
    assert fixes == ["cmyk"] and r > 200 and g < 60 and b < 60  # magenta+yellow = red
    assert E.read_caption(b"\xff ok") == ("\ufffd ok", ["caption_not_utf8"])


def test_bad_samples_and_bad_shards(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    n_bad, skipped, fixed = bad_corpus(d / "bad.tar")
    with tarfile.open(d / "empty.tar", "w"):
        pass  # a valid tar with no members
    write_shards(tmp_path / "good", 2, 12)
    good = (tmp_path / "good" / "00000.tar").read_bytes()
    (d / "cut.tar").write_bytes(good[: len(good) // 2])  # fails mid-shard, after some batches
    (d / "garbage.tar").write_bytes(os.urandom(3000))
    (d / "good.tar").write_bytes((tmp_path / "good" / "00001.tar").read_bytes())
    spec = f"{d}/{{bad,empty,missing,garbage,cut,good}}.tar"  # brace order = part order
    store = tmp_path / "store"
    args = tiny_args(tmp_path, spec, store, "embed.max_pixels=50000", "embed.workers=2",
                     "embed.batch_size=4")
    with pytest.raises(SystemExit) as e:
        stage_cli("embed", args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "3 of 6 shards failed" in err, err[-1500:]
    for name in ("missing.tar", "garbage.tar", "cut.tar"):
        assert f"{d / name}" in err
    m = json.loads((store / "manifest.json").read_text())
    assert not m["complete"] and [f["part"] for f in m["failed_shards"]] == [2, 3, 4]
    assert [(p["part"], p["rows"]) for p in m["parts"]] == [(0, n_bad - 8), (1, 0), (5, 12)]
    assert m["parts"][0]["samples"] == n_bad
    assert m["skipped"] == skipped and m["fixed"] == fixed
    st = EmbeddingStore(store)
    assert st.parts("img") == [0, 1, 5] and st.load("joint", 1).shape == (0, 16)
    meta = st.metadata(0).to_pydict()
    assert meta["key"] == ["ok", "cmyk", "sixteen", "palette", "palette_alpha", "rgba", "gray",
                           "rotated", "nocap", "emptycap", "latin1"]
    assert meta["shard_row"] == [0, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15]
    assert meta["caption"][-3:] == ["", "", "caf\ufffd cr\ufffdme"]
    assert not np.isnan(np.asarray(st.load("img", 0), np.float32)).any()


def test_pipe_inputs(tmp_path, capsys):
    """``pipe:`` sources (e.g. ``pipe:aws s3 cp s3://... -``) read like local shards; a failing
    command fails only its shard."""
    write_shards(tmp_path / "shards", 2, 6)
    spec = f"pipe:cat {tmp_path}/shards/{{00000..00002}}.tar"  # 00002 does not exist
    store = tmp_path / "store"
    with pytest.raises(SystemExit):
        stage_cli("embed", tiny_args(tmp_path, spec, store, "run.allow_pipe=true"))
    assert f"part 2: pipe:cat {tmp_path}/shards/00002.tar" in capsys.readouterr().err
    st = EmbeddingStore(store)
    assert st.parts("img") == [0, 1] and st.check("joint")[3] == [6, 6]
    assert st.metadata(1).column("shard").to_pylist() == [f"pipe:cat {tmp_path}/shards/00001.tar"] * 6


# ---------------------------------------------------------------- LAION / clip-retrieval stores

def test_reader_accepts_clip_retrieval_store_without_manifest(tmp_path):
    """LAION's released embeddings: img_emb/text_emb + metadata, no joint_emb, no manifest."""
    rng = np.random.default_rng(0)
    for part, n in ((0, 5), (1, 3)):
        for kind in ("img", "text"):
            x = rng.normal(size=(n, 8)).astype(np.float16)
            (tmp_path / f"{kind}_emb").mkdir(exist_ok=True)
            np.save(tmp_path / f"{kind}_emb" / f"{kind}_emb_{part}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
        (tmp_path / "metadata").mkdir(exist_ok=True)
        pq.write_table(pa.table({"image_path": [f"{part}_{i}" for i in range(n)],
                                 "caption": ["c"] * n, "url": ["u"] * n}),
                       tmp_path / "metadata" / f"metadata_{part}.parquet")
    st = EmbeddingStore(tmp_path)
    assert st.kinds == ["img", "text"] and st.parts("text") == [0, 1]
    assert st.check("img")[1:] == (8, np.float16, [5, 3])
    assert [(p, s, b.shape) for p, s, b in st.iter_blocks("img", 4)] == [(0, 0, (4, 8)), (0, 4, (1, 8)),
                                                                          (1, 0, (3, 8))]
    assert st.metadata(1).column("image_path").to_pylist() == ["1_0", "1_1", "1_2"]
    with pytest.raises(StoreError, match="joint_emb"):
        st.parts("joint")
    assert E.part_info(tmp_path, 0) == {"part": 0, "rows": 5}  # our reader of counts copes too


# ---------------------------------------------------------------- fused embed -> assign

def test_fused_embed_assign_equals_embed_then_assign(tmp_path):
    """embed.assign_centroids: labels and sims written by stage 1 itself equal stage 1 + stage 2b
    (engine=torch) exactly; with kinds=[] only metadata and labels are written; a lost label part
    is redone on rerun (and only it)."""
    from clustering import assign as asg
    from pipeline.core.store import LabelStore
    write_shards(tmp_path / "shards", 3, 12)
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")
    base = tiny_args(tmp_path, spec, tmp_path / "store", "embed.workers=0")[2:]
    E.main(str(ROOT / "configs/debug.yaml"), base)
    rng = np.random.default_rng(0)
    c = rng.standard_normal((300, 16)).astype(np.float32)  # K >= 4 * 16 * l: the grouped kernel
    np.save(tmp_path / "centroids.npy", c)
    asg.main(None, [f"run.out_dir={tmp_path / 'run'}", f"assign.store={tmp_path / 'store'}",
                    f"assign.centroids={tmp_path / 'centroids.npy'}", f"assign.out_dir={tmp_path / 'ref'}",
                    "assign.engine=torch", "assign.l=4", "assign.report=false"])
    fused = [a for a in base if not a.startswith("embed.out_dir")] + [
        f"embed.out_dir={tmp_path / 'fused'}", "embed.kinds=[]", f"embed.labels_dir={tmp_path / 'labels'}",
        f"embed.assign_centroids={tmp_path / 'centroids.npy'}", "embed.assign_l=4"]
    s = E.main(str(ROOT / "configs/debug.yaml"), fused)
    assert s["parts_written"] == 3 and s["labels"]["complete"] and s["labels"]["rows"] == 36
    ref, got = LabelStore(tmp_path / "ref"), LabelStore(tmp_path / "labels")
    assert ref.parts() == got.parts() == [0, 1, 2]
    for p in ref.parts():
        (rl, rs), (gl, gs) = ref.load(p), got.load(p)
        assert rl.shape == (12, 4) and gl.dtype == np.int32 and gs.dtype == np.float16
        np.testing.assert_array_equal(gl, rl)
        np.testing.assert_array_equal(gs, rs)
    assert len(np.unique(rl[:, 0])) > 1  # labels that could differ
    assert not any((tmp_path / "fused" / f"{k}_emb").exists() for k in ("img", "text", "joint"))
    assert (tmp_path / "fused/metadata/metadata_2.parquet").is_file()
    # stage 2b's state.json fields: assign on the same centers finds these labels done
    st = json.loads((tmp_path / "labels/state.json").read_text())
    assert st == json.loads((tmp_path / "ref/state.json").read_text())
    # resume: a part without labels is redone, the others are skipped
    (tmp_path / "labels/labels_1.npy").unlink()
    s = E.main(str(ROOT / "configs/debug.yaml"), fused)
    assert s["parts_written"] == 1 and s["rows"] == 12
    np.testing.assert_array_equal(got.load(1)[0], ref.load(1)[0])
    with pytest.raises(E.ConfigError, match="kinds"):  # nothing would be written
        E.EmbedConfig(kinds=[])
    # a wrong centers file is one line before any work
    np.save(tmp_path / "bad.npy", c[:, :8])
    with pytest.raises(StoreError, match="bad.npy.*dim 16"):
        E.main(str(ROOT / "configs/debug.yaml"), fused + [f"embed.assign_centroids={tmp_path / 'bad.npy'}",
                                                          "run.overwrite=true"])


@pytest.mark.slow
def test_fused_two_ranks_equal_assign(tiny):
    """2 ranks labelling in stage 1 == stage 2b over the 1-rank reference store (same threads)."""
    from pipeline.core.store import LabelStore
    tmp, spec, ref = tiny
    c = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp / "fused_centroids.npy", c)
    torchrun(["-m", "clustering.assign", "--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={tmp / 'run'}",
              f"assign.store={ref}", f"assign.centroids={tmp / 'fused_centroids.npy'}",
              f"assign.out_dir={tmp / 'fused_ref_labels'}", "assign.engine=torch", "assign.l=4", "assign.kind=joint",
              "assign.report=false"], nproc=1)
    torchrun(["-m", "pipeline.embed", *tiny_args(
        tmp, spec, tmp / "fused_store", "embed.workers=1", "embed.kinds=[]", f"embed.labels_dir={tmp / 'fused_labels'}",
        f"embed.assign_centroids={tmp / 'fused_centroids.npy'}", "embed.assign_l=4")], nproc=2)
    a, b = LabelStore(tmp / "fused_ref_labels"), LabelStore(tmp / "fused_labels")
    assert a.parts() == b.parts() == list(range(12))
    for p in a.parts():
        for x, y in zip(a.load(p), b.load(p)):
            np.testing.assert_array_equal(x, y)
    m = json.loads((tmp / "fused_labels/manifest.json").read_text())
    assert m["complete"] and m["rows"] == 12 * 16 and m["fused"] and m["l"] == 4
