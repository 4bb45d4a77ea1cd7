"""Config system, distributed context under real torchrun, demo shard builder."""
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.core.config import ConfigError, check, load_config, prepare_out_dir
from tests.conftest import ROOT, torchrun


@dataclass
class Inner:
    lr: float = 1e-3
    name: str = "adamw"

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "must be > 0")


@dataclass
class Toy:
    batch_size: int = 8
    path: str = "${run.out_dir}/toy"
    optim: Inner = field(default_factory=Inner)

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


def _write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_config_merge_base_overrides_and_interpolation(tmp_path):
    _write(tmp_path, "run:\n  out_dir: /x\ntrain:\n  batch_size: 4\n", "base.yaml")
    p = _write(tmp_path, "base: base.yaml\ntrain:\n  optim:\n    lr: 0.5\n")
    run, toy = load_config(p, ["train.batch_size=16", "run.seed=3"], "train", Toy)
    assert (toy.batch_size, toy.optim.lr, toy.optim.name) == (16, 0.5, "adamw")
    assert toy.path == "/x/toy" and run.seed == 3 and isinstance(toy.optim, Inner)


@pytest.mark.parametrize("text,override,needle", [
    ("train:\n  batch_sise: 4\n", [], "batch_sise"),                         # unknown key in file
    ("train:\n  batch_size: many\n", [], "batch_size"),                      # wrong type in file
    ("train: {}\n", ["train.optim.lrr=1"], "optim.lrr"),                    # unknown key on CLI
    ("train: {}\n", ["train.batch_size=x"], "batch_size"),                  # wrong type on CLI
    ("train:\n  batch_size: 0\n", [], "batch_size=0"),                        # out of range
    ("train:\n  optim:\n    lr: -1\n", [], "optim.lr=-1"),                    # nested range
    ("trian: {}\n", [], "unknown section 'trian'"),                          # unknown section
])
def test_config_errors_name_key_value_and_file(tmp_path, text, override, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, override, "train", Toy)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert str(p.name) in msg or "override" in msg


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", [], "train", Toy)


def test_cli_exit_code_2_and_one_line(tmp_path):
    p = _write(tmp_path, "data:\n  image_sise: 3\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.demo.demo_data", "--config", str(p)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "data.image_sise" in r.stderr and "exp.yaml" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_out_dir_with_different_config_refused(tmp_path):
    run, toy = load_config(None, [f"run.out_dir={tmp_path}"], "train", Toy)
    prepare_out_dir(tmp_path, run, {"run": run, "train": toy}, "train")
    assert (tmp_path / "config.train.yaml").exists()
    prepare_out_dir(tmp_path, run, {"run": run, "train": toy}, "train")  # same config: fine
    run2, toy2 = load_config(None, [f"run.out_dir={tmp_path}", "train.batch_size=99"], "train", Toy)
    with pytest.raises(ConfigError, match="batch_size: 8 -> 99"):
        prepare_out_dir(tmp_path, run2, {"run": run2, "train": toy2}, "train")
    run3, _ = load_config(None, [f"run.out_dir={tmp_path}", "run.resume=true"], "train", Toy)
    prepare_out_dir(tmp_path, run3, {"run": run3, "train": toy2}, "train")


def test_default_config_dumps_match_schemas():
    """configs/defaults/<stage>.yaml document the dataclass defaults and must not drift."""
    import yaml

    from launch.check import default_sections
    sections = default_sections()
    assert {p.stem for p in (ROOT / "configs" / "defaults").glob("*.yaml")} == set(sections), \
        "configs/defaults/ holds a file of no section, or misses one: run `python -m launch.check --write-defaults`"
    for name, cfg in sections.items():
        path = ROOT / "configs" / "defaults" / f"{name}.yaml"
        assert path.is_file(), f"{path} missing: run `python -m launch.check --write-defaults`"
        from pipeline.core.config import to_dict
        assert yaml.safe_load(path.read_text()) == {name: to_dict(cfg)}, f"{path} is stale"


def test_every_shipped_config_validates():
    from launch.check import check_file
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        check_file(path, [])


DIST_SCRIPT = """
import torch, json, os, sys
from pipeline.core.dist import init_distributed, destroy
ctx = init_distributed()
t = torch.tensor([float(ctx.rank + 1)])
ctx.all_reduce_(t)
items = ctx.shard(list(range(10)))
out = dict(rank=ctx.rank, world=ctx.world_size, backend=ctx.backend, sum=t.item(), items=items,
           gathered=ctx.all_gather_object(ctx.rank))
open(os.path.join(sys.argv[1], f"r{ctx.rank}.json"), "w").write(json.dumps(out))
destroy(ctx)
"""


def test_distributed_context_under_torchrun(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(DIST_SCRIPT)
    torchrun([str(script), str(tmp_path)], nproc=2)
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert [x["rank"] for x in r] == [0, 1] and all(x["world"] == 2 for x in r)
    assert all(x["backend"] == "gloo" and x["sum"] == 3.0 and x["gathered"] == [0, 1] for x in r)
    assert r[0]["items"] == [0, 2, 4, 6, 8] and r[1]["items"] == [1, 3, 5, 7, 9]


def test_single_process_context_without_launcher(monkeypatch):
    from pipeline.core.dist import init_distributed
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.group) == (0, 1, False, None)


def test_demo_shards_read_back(demo_data):
    root, summary = demo_data
    shards = sorted((root / "train").glob("*.tar"))
    assert shards
    keys, n = set(), 0
    for shard in shards:
        stats = json.loads(shard.with_name(shard.stem + "_stats.json").read_text())
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        assert len(samples) == stats["successes"]
        table = pq.read_table(shard.with_suffix(".parquet"))
        assert table.num_rows == stats["count"]
        for s in samples:
            assert "jpg" in s and s["txt"] and json.loads(s["json"])["key"] == s["__key__"]
            keys.add(s["__key__"])
            n += 1
    assert len(keys) == n == summary["train"]["samples"]
    probe = root / "probe" / "openclipart" / "test"
    classes = json.loads((probe / "classes.json").read_text())
    s = next(iter(wds.WebDataset(str(probe / "00000.tar"), shardshuffle=False)))
    assert 0 <= json.loads(s["json"])["cls"] < len(classes)


def test_decompression_bomb_skipped_and_counted(tmp_path):
    from PIL import Image

    from pipeline.demo import demo_data as dd
    src = tmp_path / "png" / "animals"
    src.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(src / "red_fox_01.png")
    Image.new("RGB", (300, 300), "blue").save(src / "huge_whale_01.png")  # 90k px > limit below
    (src / "broken_cat_01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = dd.main(None, [f"run.out_dir={tmp_path}/run", f"data.openclipart_dir={tmp_path}/png",
                             "data.max_pixels=50000", "data.emoji_max=1", "data.fmnist_train=0",
                             "data.fmnist_test=0", "data.workers=1", "data.image_size=32"])
    t = summary["train"]
    assert t["skipped"].get("decompression_bomb") == 1
    assert sum(v for k, v in t["skipped"].items() if k.startswith("decode_error")) == 1
    assert t["samples"] == 2  # the fox and one emoji
