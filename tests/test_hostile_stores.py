"""Stores, labels and shard lists that do not belong together (issue 26, red-team findings): each
case runs the real stage in-process through its CLI entry (``cli(argv)``: the line printed and the
exit code are what a user gets) and asserts the one line, the exit code and that the data on disk
is unchanged. Records: pipeline/core/provenance.py.

One small real pipeline is built once: two demo shards (the ``demo_data`` fixture,
configs/debug.yaml) embedded by a tiny random-init open_clip model, k-means centers drawn from
the store, labels from ``clustering.assign``. Everything else is a copy of it, changed the way the
red team changed it.
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.test_region_labels import run_dir  # noqa: F401 -- the fixture: a region store labelled by assign

CFG = str(ROOT / "configs/debug.yaml")
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TRAIN_TINY = ["train.model.name=vit_tiny_rope2d", "train.model.image_size=32", "train.model.patch_size=8",
              "train.model.width=32", "train.model.layers=1", "train.model.heads=2", "train.model.mlp_dim=64",
              "train.model.embed_dim=16", "train.deepspeed.precision=fp32", "train.data.batch_size=8",
              "train.data.workers=0", "train.steps=1", "train.loss.num_labels=2"]


def cli(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, the error lines printed) of ``python -m module argv``, run in this process."""
    from pipeline.core.entry import stage_cli
    from pipeline.core.stages import name_of_module
    capsys.readouterr()
    try:
        stage_cli(name_of_module(module), argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, [ln for ln in err.splitlines() if ln.startswith(("error:", "config error:"))]


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (the lock and temp files aside)."""
    out = {}
    for f in folders:
        for p in sorted(f.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def embed_args(root: Path, shards: list[str], store: Path, *extra) -> list[str]:
    lst = root / f"list-{hashlib.sha1('|'.join(shards).encode()).hexdigest()[:8]}.txt"
    lst.write_text("\n".join(shards) + "\n")
    model = root / "tiny-clip.json"
    model.write_text(json.dumps(TINY_CLIP))
    return ["--config", CFG, f"run.out_dir={root / 'run'}", f"embed.input={lst}", f"embed.out_dir={store}",
            "embed.encoder.kind=open_clip", f"embed.encoder.model_config={model}", "embed.encoder.pretrained=null",
            "embed.encoder.image_size=0", "embed.kinds=[img]", "embed.workers=0", *extra]


def assign_args(root: Path, store: Path, labels: Path, centroids: Path) -> list[str]:
    return ["--config", CFG, f"run.out_dir={root / 'run'}", f"assign.store={store}", "assign.kind=img",
            f"assign.centroids={centroids}", f"assign.out_dir={labels}", "assign.engine=torch", "assign.l=2",
            "assign.report=false"]


def train_args(root: Path, shards: list[str], store: Path, labels: Path, centroids: Path, *extra) -> list[str]:
    lst = root / f"train-{hashlib.sha1('|'.join(shards).encode()).hexdigest()[:8]}.txt"
    lst.write_text("\n".join(shards) + "\n")
    return ["--config", CFG, f"run.out_dir={root / 'run'}", *TRAIN_TINY, f"train.data.shards={lst}",
            f"train.data.store={store}", f"train.data.labels={labels}", f"train.centroids={centroids}", *extra]


@pytest.fixture(scope="module")
def base(demo_data, tmp_path_factory):
    """Two demo shards -> store (records) -> centers -> labels (records); paths in a dict."""
    from clustering import assign
    from pipeline import embed
    root = tmp_path_factory.mktemp("hostile")
    shards = sorted(str(p) for p in (demo_data[0] / "train").glob("*.tar"))[:2]
    assert len(shards) == 2
    store, labels, cent = root / "store", root / "labels", root / "centroids.npy"
    embed.main(CFG, embed_args(root, shards, store)[2:])
    x = np.concatenate([np.load(store / f"img_emb/img_emb_{i}.npy") for i in (0, 1)]).astype(np.float32)
    np.save(cent, x[np.random.default_rng(0).choice(len(x), 8, replace=False)])
    assign.main(CFG, assign_args(root, store, labels, cent)[2:])
    return {"root": root, "shards": shards, "store": store, "labels": labels, "centroids": cent}


def copy_of(base: dict, tmp: Path) -> dict:
    """A private copy of the base pipeline's folders (shards stay shared: they are only read)."""
    out = dict(base, root=tmp)
    for k in ("store", "labels"):
        out[k] = tmp / k
        shutil.copytree(base[k], out[k])
    out["centroids"] = tmp / "centroids.npy"
    shutil.copy2(base["centroids"], out["centroids"])
    return out


def relabel(b: dict, tmp: Path, change) -> None:
    """Labels of another store: a copy of the store changed by ``change(metadata table, emb rows)``
    per part, labelled by assign with the same centers; its part 0 (labels, sims, record) replaces
    ours. Same rows per part, so row counts cannot tell them apart."""
    from clustering import assign
    other = tmp / "other"
    shutil.copytree(b["store"], other)
    for i in (0, 1):
        mp, ep = other / f"metadata/metadata_{i}.parquet", other / f"img_emb/img_emb_{i}.npy"
        t, x = change(pq.read_table(mp), np.load(ep))
        pq.write_table(t, mp)
        np.save(ep, x)
    assign.main(CFG, assign_args(tmp, other, tmp / "other_labels", b["centroids"])[2:])
    for name in ("labels_0.npy", "sims_0.npy", "labels_0.json"):
        shutil.copy2(tmp / "other_labels" / name, b["labels"] / name)


def foreign_keys(t: pa.Table, x: np.ndarray):
    keys = pa.array([f"other-{k}" for k in t.column("key").to_pylist()], pa.string())
    return t.set_column(t.schema.get_field_index("key"), "key", keys), x


def permuted_rows(t: pa.Table, x: np.ndarray):
    order = np.random.default_rng(1).permutation(t.num_rows)
    return t.take(pa.array(order)), x[order]


def case_foreign_labels(b, tmp):
    relabel(b, tmp, foreign_keys)
    return ("training.train", train_args(tmp, b["shards"], b["store"], b["labels"], b["centroids"]), 1,
            r"labels_0.npy does not label \S+metadata_0.parquet \(train.centroids=\S+\): keys differ")


def case_permuted_rows(b, tmp):
    relabel(b, tmp, permuted_rows)
    return ("training.train", train_args(tmp, b["shards"], b["store"], b["labels"], b["centroids"]), 1,
            r"labels_0.npy does not label \S+metadata_0.parquet .*keys differ .*rows reordered")


def case_other_centroids(b, tmp):
    c = np.load(b["centroids"])
    np.save(tmp / "other_centroids.npy", c[::-1].copy())  # same K and D, another k-means run
    return ("training.train", train_args(tmp, b["shards"], b["store"], b["labels"], tmp / "other_centroids.npy"),
            1, r"labels_0.npy does not label .*metadata_0.parquet .*other_centroids.npy\): assigned with other centers")


def case_shards_reordered(b, tmp):
    return ("training.train", train_args(tmp, b["shards"][::-1], b["store"], b["labels"], b["centroids"]), 1,
            r"metadata_0.parquet: part 0 was made from \S+/(\d+).tar, not \S+/(?!\1)\d+.tar \(train.data.shards")


def case_missing_centroids_with_num_classes(b, tmp):
    return ("training.train", train_args(tmp, b["shards"], b["store"], b["labels"], tmp / "nope.npy",
                                         "train.partial_fc.num_classes=8"), 1,
            r"nope.npy: k-means centroids not found .*also with train.partial_fc.num_classes set")


def case_duplicate_label_part(b, tmp):
    shutil.copy2(b["labels"] / "labels_1.npy", b["labels"] / "labels_01.npy")
    return ("training.train", train_args(tmp, b["shards"], b["store"], b["labels"], b["centroids"]), 1,
            r"labels: labels_01.npy and labels_1.npy both hold part 1")


def case_duplicate_emb_part(b, tmp):
    shutil.copy2(b["store"] / "img_emb/img_emb_1.npy", b["store"] / "img_emb/img_emb_01.npy")
    return ("clustering.assign", assign_args(tmp, b["store"], tmp / "labels2", b["centroids"]), 1,
            r"img_emb: img_emb_01.npy and img_emb_1.npy both hold part 1")


def case_encoder_changed_resume(b, tmp):
    return ("pipeline.embed", embed_args(tmp, b["shards"], b["store"], "run.resume=true",
                                         "embed.encoder.precision=fp32"), 2,
            r"metadata_0.parquet: part 0 was embedded with a different config \(embed.encoder: .*run.overwrite=true")


def case_shard_inserted(b, tmp):
    extra = tmp / "extra" / "00009.tar"
    extra.parent.mkdir()
    shutil.copy2(b["shards"][1], extra)
    s0, s1 = b["shards"]
    return ("pipeline.embed", embed_args(tmp, [s0, str(extra), s1], b["store"]), 1,
            r"metadata_1.parquet: part 1 was made from \S+/00001.tar, not \S+/extra/00009.tar \(embed.input=.* "
            r"another shard at position 1: the shard list changed\); pass run.overwrite=true")


def case_shard_removed(b, tmp):
    return ("pipeline.embed", embed_args(tmp, b["shards"][:1], b["store"]), 1,
            r"metadata_1.parquet: part 1 was made from \S+/00001.tar, but embed.input=.* lists 1 shards now")


def case_shard_listed_twice(b, tmp):
    s0, s1 = b["shards"]
    return ("pipeline.embed", embed_args(tmp, [s0, s1, s0], b["store"]), 2,
            r"embed.input=.* lists \S+/00000.tar twice \(positions 0 and 2\)")


CASES = {f.__name__[5:]: f for f in (
    case_foreign_labels, case_permuted_rows, case_other_centroids, case_shards_reordered,
    case_missing_centroids_with_num_classes, case_duplicate_label_part, case_duplicate_emb_part,
    case_encoder_changed_resume, case_shard_inserted, case_shard_removed, case_shard_listed_twice)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case_is_one_line(name, base, tmp_path, capsys):
    b = copy_of(base, tmp_path)
    module, argv, want_code, pattern = CASES[name](b, tmp_path)
    before = snapshot(b["store"], b["labels"])
    code, lines = cli(module, argv, capsys)
    assert code == want_code, lines
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(b["store"], b["labels"]) == before  # nothing written, nothing removed
    assert not (tmp_path / "run/train/checkpoints").exists()


def part_records(store: Path) -> list[dict]:
    from pipeline.core.provenance import part_record
    return [part_record(p) for p in sorted((store / "metadata").glob("metadata_*.parquet"))]


def test_overwrite_really_starts_over(base, tmp_path, capsys):
    """run.overwrite=true after an encoder change: every old part is removed first and embedded
    again (a narrower model: every array has the new width), each with the new encoder's record."""
    b = copy_of(base, tmp_path)
    (tmp_path / "narrow.json").write_text(json.dumps({**TINY_CLIP, "embed_dim": 8}))
    old = part_records(b["store"])
    code, lines = cli("pipeline.embed", embed_args(tmp_path, b["shards"], b["store"], "run.overwrite=true",
                                                   f"embed.encoder.model_config={tmp_path / 'narrow.json'}"), capsys)
    assert code == 0 and not lines
    new = part_records(b["store"])
    assert len(new) == 2 and all(r["encoder_sha256"] != old[0]["encoder_sha256"] for r in new)
    assert [r["shard"] for r in new] == b["shards"]
    assert sorted(p.name for p in (b["store"] / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    assert all(np.load(p).shape[1] == 8 for p in (b["store"] / "img_emb").iterdir())
    m = json.loads((b["store"] / "manifest.json").read_text())
    assert m["dims"] == {"img": 8} and m["num_parts"] == 2


def test_shard_appended_then_rewritten(base, tmp_path, capsys):
    """A shard appended to the list is embedded as the next part (the others untouched); a shard
    rewritten since its part was made (mtime) has that part embedded again, and only it."""
    from pipeline import embed
    b = copy_of(base, tmp_path)
    extra = tmp_path / "extra" / "00009.tar"
    extra.parent.mkdir()
    shutil.copy(b["shards"][1], extra)
    before = snapshot(b["store"] / "img_emb")
    args = embed_args(tmp_path, [*b["shards"], str(extra)], b["store"], "run.resume=true")[2:]
    s = embed.main(CFG, args)
    assert s["parts_written"] == 1 and s["manifest"]["num_parts"] == 3
    after = snapshot(b["store"] / "img_emb")
    assert {k: after[k] for k in before} == before and len(after) == 3
    assert part_records(b["store"])[2]["shard"] == str(extra)
    st = extra.stat()
    os.utime(extra, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = embed.main(CFG, args)
    assert s["parts_written"] == 1 and part_records(b["store"])[2]["shard_mtime_ns"] == st.st_mtime_ns + 10**9
    assert s["manifest"]["complete"] and s["manifest"]["num_parts"] == 3


def test_folder_without_records_warns_and_refreshes(base, tmp_path, caplog):
    """Label parts written before records were kept: training goes on with one warning naming how
    to refresh; rerunning assign writes the records (and the check then binds them)."""
    from clustering import assign
    from pipeline.core.config import load_config
    from pipeline.core.dist import DistContext
    from training.train import TrainConfig
    from training.validate import check_inputs
    b = copy_of(base, tmp_path)
    for p in b["labels"].glob("labels_*.json"):
        p.unlink()
    cfg = load_config(None, train_args(tmp_path, b["shards"], b["store"], b["labels"], b["centroids"])[2:],
                      "train", TrainConfig)[1]
    with caplog.at_level("WARNING"):
        check_inputs(cfg, DistContext())
    assert "2 label part(s)" in caplog.text and "rerun `mlcd assign` to refresh" in caplog.text
    assign.main(CFG, [*assign_args(tmp_path, b["store"], b["labels"], b["centroids"])[2:], "run.resume=true"])
    assert sorted(p.name for p in b["labels"].glob("labels_*.json")) == ["labels_0.json", "labels_1.json"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_inputs(cfg, DistContext())
    assert "label part(s)" not in caplog.text


def test_keys_digest_is_the_same_from_any_column_layout(tmp_path):
    """The vectorized digest of the key column equals the one of the Python key list (what stage 1
    records for fused labels) and the one of clip-retrieval's image_path column; order matters."""
    from pipeline.core.provenance import keys_digest, keys_digest_of
    keys = ["a", "bb", "", "ccc", "ü"]
    pq.write_table(pa.table({"key": keys}), tmp_path / "k.parquet", row_group_size=2)
    pq.write_table(pa.table({"image_path": [f"/x/{k}.jpg" if k else "" for k in keys]}), tmp_path / "i.parquet")
    assert keys_digest(tmp_path / "k.parquet") == keys_digest_of(keys)
    assert keys_digest_of(["ab", "c"]) != keys_digest_of(["a", "bc"]) != keys_digest_of(["c", "ab"])
    from pipeline.core.store import read_keys
    assert keys_digest(tmp_path / "i.parquet") == keys_digest_of(read_keys(tmp_path / "i.parquet"))


def test_region_labels_refuse_assign_labels_of_reordered_regions(run_dir, capsys):  # noqa: F811
    """Region metadata rows reordered after assign labelled them: stage 2c refuses in one line
    (assign's record holds the keys in their old order), before writing anything."""
    root = run_dir
    mp = root / "regions/store/metadata/metadata_0.parquet"
    t = pq.read_table(mp)
    pq.write_table(t.take(pa.array(np.arange(t.num_rows)[::-1].copy())), mp)
    before = snapshot(root / "regions/store", root / "regions/clusters")
    code, lines = cli("clustering.region_labels", ["--config", CFG, f"run.out_dir={root}"], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert re.search(r"labels/labels_0.npy does not label \S+/metadata_0.parquet \(region_labels.centroids="
                     r"\S+\): keys differ", lines[0]), lines[0]
    assert snapshot(root / "regions/store", root / "regions/clusters") == before
    assert not (root / "regions/labels/labels_0.npy").exists()
