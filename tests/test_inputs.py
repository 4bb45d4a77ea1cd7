"""Inputs beyond webdataset (pipeline/core/sources.py): image folders (flat or class sub-folders)
and .txt/.csv/.parquet image lists, for embed and eval; `mlcd data shards SRC OUT`
(pipeline/make_shards.py) writes img2dataset-layout shards from them."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import embed as E
from pipeline import make_shards as M
from pipeline.core.shards import expand_shards, read_samples
from pipeline.core.sources import SourceError, expand_input, is_file_source, list_files
from pipeline.core.store import EmbeddingStore
from tests.conftest import ROOT, torchrun
from tests.test_embed import TINY_CLIP, assert_same_store
from training.evaluation.features import EvalInputError, open_labeled

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}


def class_folder(root, per_class=4):
    for c, rgb in COLOURS.items():
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (20 + j, 18), rgb).save(root / c / f"img{j}.{'png' if j % 2 else 'jpg'}")
    return root


def flat_folder(root, n=7):
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16 + i), (10 * i, 100, 200)).save(root / f"f{i:02d}.jpg")
    (root / "f03.txt").write_text("a caption\nfor three")
    return root


def embed_args(tmp, src, store, *extra):
    cfg = tmp / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    return [f"run.out_dir={tmp / 'run'}", f"embed.input={src}", f"embed.out_dir={store}",
            "embed.encoder.kind=open_clip", f"embed.encoder.model_config={cfg}", "embed.encoder.pretrained=null",
            "embed.encoder.image_size=0", "embed.batch_size=4", "embed.workers=0", *extra]


def store_rows(store):
    st = EmbeddingStore(store)
    metas = [st.metadata(p).to_pydict() for p in st.parts("img")]
    img = np.concatenate([np.asarray(st.load("img", p), np.float32) for p in st.parts("img")])
    return st.parts("img"), [k for m in metas for k in m["key"]], [u for m in metas for u in m["url"]], img


# ---------------------------------------------------------------- listing

def test_listing_of_folders_and_lists(tmp_path):
    cf = class_folder(tmp_path / "classes")
    li = list_files(str(cf))
    assert li.classes == ("blue", "green", "red") and len(li.items) == 12
    assert [it.cls for it in li.items] == [0] * 4 + [1] * 4 + [2] * 4
    assert li.items[0].key == "blue/img0"
    ff = flat_folder(tmp_path / "flat")
    assert list_files(str(ff)).classes == () and {it.cls for it in list_files(str(ff)).items} == {None}
    # a .txt of images is an image list; a .txt of shards stays a shard list
    (tmp_path / "imgs.txt").write_text("flat/f00.jpg\nflat/f01.jpg\n")
    (tmp_path / "shards.txt").write_text("a.tar\n")
    assert is_file_source(str(tmp_path / "imgs.txt")) and not is_file_source(str(tmp_path / "shards.txt"))
    # virtual parts: deterministic, sorted, 3 files each
    parts = expand_input(str(ff), 3)
    assert len(parts) == 3 and parts == expand_input(str(ff), 3)
    assert [p.split("#")[1].split("@")[0] for p in parts] == ["0:3", "3:6", "6:7"]
    # a list without a path column, an empty folder: one line naming the file
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="bad.parquet: no path column"):
        expand_input(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        expand_input(str(tmp_path / "empty"))


# ---------------------------------------------------------------- eval

def test_eval_reads_class_folder_and_labelled_list(tmp_path):
    cf = class_folder(tmp_path / "classes")
    ds = open_labeled(str(cf))
    assert ds.classes == ["blue", "green", "red"] and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    img, y = ds[9]
    assert y == 2 and img.getpixel((2, 2))[0] > 150  # a red one
    # a CSV list with a cls column, paths relative to the list
    rows = [f"classes/{c}/img{j}.{'png' if j % 2 else 'jpg'},{i}" for i, c in enumerate(COLOURS) for j in range(2)]
    (tmp_path / "probe.csv").write_text("path,cls\n" + "\n".join(rows) + "\n")
    ds = open_labeled(str(tmp_path / "probe.csv"))
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2] and ds[2][0].getpixel((1, 1))[1] > 150
    # a flat folder has no classes: one line
    with pytest.raises(EvalInputError, match="has no class"):
        open_labeled(str(flat_folder(tmp_path / "flat")))


# ---------------------------------------------------------------- embed

def test_embed_flat_folder_and_lists_give_the_same_store(tmp_path):
    ff = flat_folder(tmp_path / "flat")
    names = sorted(os.listdir(ff))
    imgs = [n for n in names if n.endswith(".jpg")]
    s = E.main(str(ROOT / "configs/debug.yaml"), embed_args(tmp_path, ff, tmp_path / "s_dir", "embed.files_per_part=3"))
    assert s["rows"] == 7 and s["parts_written"] == 3 and not s["failures"]
    parts, keys, urls, ref = store_rows(tmp_path / "s_dir")
    assert parts == [0, 1, 2] and keys == [n[:-4] for n in imgs]
    assert urls == [str(ff / n) for n in imgs]
    meta = EmbeddingStore(tmp_path / "s_dir").metadata(1).to_pydict()
    assert meta["caption"][0] == "a caption for three"  # f03.txt beside f03.jpg
    # txt / csv / parquet lists of the same files (as keys: the csv/parquet key column)
    (tmp_path / "l.txt").write_text("\n".join(f"flat/{n}" for n in imgs) + "\n")
    (tmp_path / "l.csv").write_text("key,filepath\n" + "\n".join(f"{n[:-4]},{ff / n}" for n in imgs) + "\n")
    pq.write_table(pa.table({"key": [n[:-4] for n in imgs], "image_path": [str(ff / n) for n in imgs]}),
                   tmp_path / "l.parquet")
    for lst in ("l.txt", "l.csv", "l.parquet"):
        store = tmp_path / f"s_{lst}"
        s = E.main(str(ROOT / "configs/debug.yaml"), embed_args(tmp_path, tmp_path / lst, store))
        assert s["rows"] == 7 and s["parts_written"] == 1, lst
        _, k, u, x = store_rows(store)
        assert u == urls, lst
        assert k == (keys if lst != "l.txt" else [f"{i:09d}" for i in range(7)]), lst
        np.testing.assert_allclose(x, ref, atol=2e-3)  # same pictures, same features
    # rerun: nothing to do; an edited image re-embeds only its part; a missing file is counted
    store = tmp_path / "s_dir"
    args = embed_args(tmp_path, ff, store, "embed.files_per_part=3")
    assert E.main(str(ROOT / "configs/debug.yaml"), args)["parts_written"] == 0
    Image.new("RGB", (30, 30), (1, 2, 3)).save(ff / "f04.jpg")
    s = E.main(str(ROOT / "configs/debug.yaml"), args)
    assert s["parts_written"] == 1 and s["rows"] == 3
    (tmp_path / "l.txt").write_text("flat/f00.jpg\nflat/gone.jpg\n")
    s = E.main(str(ROOT / "configs/debug.yaml"), embed_args(tmp_path, tmp_path / "l.txt", tmp_path / "s_gone"))
    assert s["rows"] == 1 and s["manifest"]["skipped"] == {"file_missing": 1}
    # files added before a finished part: the part list changed, refused in one line
    Image.new("RGB", (16, 16)).save(ff / "a00.jpg")
    with pytest.raises(Exception, match="the shard list changed"):
        E.main(str(ROOT / "configs/debug.yaml"), args)


@pytest.mark.slow
def test_two_ranks_embed_a_folder_like_one_rank(tmp_path):
    """Every rank lists the folder itself; the parts (and DataLoader workers reading them) agree."""
    ff = flat_folder(tmp_path / "flat", n=10)
    one, two = tmp_path / "one", tmp_path / "two"
    E.main(str(ROOT / "configs/debug.yaml"), embed_args(tmp_path, ff, one, "embed.files_per_part=3"))
    args = embed_args(tmp_path, ff, two, "embed.files_per_part=3", "embed.workers=1")
    torchrun(["-m", "pipeline.embed", "--config", str(ROOT / "configs/debug.yaml"), *args], nproc=2)
    assert_same_store(one, two, exact=False)
    assert json.loads((two / "manifest.json").read_text())["num_parts"] == 4


# ---------------------------------------------------------------- mlcd data shards

def test_data_shards_from_folder_resumable_and_counts_bad_images(tmp_path, capsys):
    cf = class_folder(tmp_path / "classes", per_class=3)
    (cf / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    Image.new("RGB", (400, 4)).save(cf / "green" / "thin.png")  # 100:1, over max_aspect 32
    out = tmp_path / "shards"
    assert M.main([str(cf), str(out), "--per-shard", "4"]) == 0
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["shards"] == 3 and totals["count"] == 11 and totals["successes"] == 9
    assert totals["status_dict"] == {"success": 9, "not_an_image": 1, "extreme_aspect": 1}
    assert json.loads((out / "classes.json").read_text()) == ["blue", "green", "red"]
    samples = [s for url in expand_shards(str(out)) for s in read_samples(url)]
    assert len(samples) == 9 and all({"jpg", "txt", "json"} <= set(s) for s in samples)
    cls = {s["__key__"]: json.loads(s["json"])["cls"] for s in samples}
    assert cls["blue/img0"] == 0 and cls["red/img2"] == 2 and "red/broken" not in cls
    assert Image.open(__import__("io").BytesIO(samples[0]["jpg"])).size == (20, 18)
    st = json.loads((out / "00001_stats.json").read_text())  # green/img1, img2, thin; red/broken
    assert st["status_dict"] == {"success": 2, "not_an_image": 1, "extreme_aspect": 1}
    assert st["source_part"].startswith("files:")
    rows = pq.read_table(out / "00001.parquet").to_pylist()
    assert [(r["key"], r["error_message"]) for r in rows][2:] == [("green/thin", "extreme_aspect"),
                                                                  ("red/broken", "not_an_image")]
    # eval reads the shards as a probe set (cls + classes.json)
    assert open_labeled(str(out)).labels.tolist() == sorted(cls.values())
    # resumable: finished shards are kept, a removed one is rewritten identically
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    before = list(read_samples(str(out / "00001.tar")))
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").unlink()
    assert M.main([str(cf), str(out), "--per-shard", "4"]) == 0
    assert list(read_samples(str(out / "00001.tar"))) == before  # same samples (tar times differ)
    assert (out / "00000.tar").stat().st_mtime_ns == mtimes["00000.tar"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 1
    # the source changed under finished shards: refused in one line, exit 1
    Image.new("RGB", (9, 9)).save(cf / "blue" / "aaa.jpg")
    assert M.main([str(cf), str(out), "--per-shard", "4"]) == 1
    assert "was made from" in capsys.readouterr().err
    # webdataset input needs no conversion: exit 2
    assert M.main([str(out), str(tmp_path / "x")]) == 2
