"""Evaluation: probes on synthetic features, labeled dataset loaders, the eval CLI with
its feature cache, and torchrun-distributed extraction equal to one rank."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun
from PIL import Image

from pipeline.core.shards import ShardWriter, encode_image
from training.evaluation import probe
from training.evaluation.features import EvalInputError, open_labeled

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _blobs(n, classes, dim, sep, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * sep
    y = np.arange(n) % classes
    return centers[y] + rng.normal(size=(n, dim)), y


@pytest.mark.parametrize("kind", ["separable", "random"])
def test_probes_reach_100_on_separable_and_chance_on_random(kind):
    classes = 5
    if kind == "separable":
        xtr, ytr = _blobs(400, classes, 16, sep=6.0, seed=0)
        xte, yte = _blobs(200, classes, 16, sep=6.0, seed=0)  # same centers (seed), new noise below
        xte = xte + np.random.default_rng(1).normal(size=xte.shape) * 0.1
    else:
        rng = np.random.default_rng(0)
        xtr, xte = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
        ytr, yte = rng.integers(0, classes, 400), rng.integers(0, classes, 400)
    lin = probe.linear_probe(xtr, ytr, xte, yte, c_grid=(0.01, 1.0), val_fraction=0.2)
    knn = probe.knn_probe(xtr, ytr, xte, yte, ks=(10, 20, 100, 200))
    assert set(knn["top1_by_k"]) == {10, 20, 100, 200} and lin["C"] in (0.01, 1.0)
    if kind == "separable":
        assert lin["top1"] >= 0.99 and knn["top1"] >= 0.99
    else:  # chance = 0.2; 400 test rows: 3 sigma ~ 0.06
        assert abs(lin["top1"] - 0.2) < 0.08 and abs(knn["top1"] - 0.2) < 0.08


def test_knn_weighted_vote_and_k_clipping():
    # two train points of class 1 very close to the query outvote three far ones of class 0
    xtr = np.array([[1, 0.01], [1, -0.01], [-1, 0.2], [-1, 0.3], [-1, 0.4]], np.float32)
    ytr = np.array([1, 1, 0, 0, 0])
    preds = probe.knn_predict(xtr, ytr, np.array([[1.0, 0.0]]), ks=(1, 5, 50), temperature=0.07)
    assert sorted(preds) == [1, 5]  # k=50 clipped to the 5 train rows
    assert preds[1][0] == 1 and preds[5][0] == 1


def _write_probe_shards(folder: Path, n: int, classes: list[str], seed: int):
    """Probe-like shards: solid-colour images, class = colour, `cls` in each json."""
    rng = np.random.default_rng(seed)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    folder.mkdir(parents=True)
    w = ShardWriter(folder, 0)
    for i in range(n):
        c = i % len(classes)
        img = Image.new("RGB", (int(rng.integers(20, 40)), 24), colours[c])
        data, ext = encode_image(img, "png")
        w.write(f"{i:05d}", data, ext, f"a {classes[c]} square", {"cls": c, "label": classes[c]})
    w.close()
    (folder / "classes.json").write_text(json.dumps(classes))


def test_shard_and_image_folder_datasets_load_with_labels(tmp_path):
    classes = ["red", "green", "blue"]
    _write_probe_shards(tmp_path / "shards", 10, classes, 0)
    ds = open_labeled(str(tmp_path / "shards"))
    assert ds.classes == classes and len(ds) == 10
    assert ds.labels.tolist() == [i % 3 for i in range(10)]
    img, y = ds[4]
    assert img.mode == "RGB" and y == 1 and img.getpixel((0, 0))[1] > 150
    # image folder: one sub-folder per class (sorted names); transparency composited on white
    classes = ["a_red", "b_green", "c_clear"]
    for c, colour in zip(classes, [(220, 30, 30, 255), (30, 200, 30, 255), (0, 0, 0, 0)]):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGBA", (16, 16), colour).save(tmp_path / "folder" / c / f"{j}.png")
    ds = open_labeled(str(tmp_path / "folder"))
    assert ds.classes == classes and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds[5][0].getpixel((3, 3)) == (255, 255, 255)
    # a probe shard without `cls` is one clear error naming the shard and the sample
    bad = tmp_path / "bad"
    bad.mkdir()
    w = ShardWriter(bad, 0)
    w.write("k0", encode_image(Image.new("RGB", (8, 8)), "png")[0], "png", "x", {})
    w.close()
    with pytest.raises(EvalInputError, match=r"00000\.tar: sample 'k0' has no integer 'cls'"):
        open_labeled(str(bad))


def _eval_config(tmp_path: Path, data: Path, extra: str = "") -> Path:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(textwrap.dedent(f"""
        run:
          out_dir: {tmp_path / 'run'}
        eval:
          datasets:
            - {{name: colours, train: {data / 'train'}, test: {data / 'test'}}}
          models:
            - {{name: tiny, kind: random, model: {{name: vit_tiny_clip, image_size: 32}}, seed: 1}}
            - {{name: oclip, kind: open_clip, arch: ViT-B-32, pretrained: null, enabled: false}}
          linear: {{c_grid: [0.1, 1.0]}}
          knn: {{ks: [2, 5]}}
          batch_size: 8
          workers: 0
        """) + extra)
    return cfg


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    _write_probe_shards(root / "train", 30, ["red", "green", "blue"], 0)
    _write_probe_shards(root / "test", 15, ["red", "green", "blue"], 1)
    return root


def test_eval_cli_writes_results_and_reuses_cached_features(tmp_path, colour_data):
    from pipeline.core.entry import stage_cli
    from training.evaluation import evaluate as ev
    cfg = _eval_config(tmp_path, colour_data)
    report = ev.main(str(cfg), [])
    out = tmp_path / "run" / "eval"
    res = json.loads((out / "results.json").read_text())
    (row,) = res["results"]
    assert row["model"] == "tiny" and row["dataset"] == "colours" and row["dim"] == 64
    # solid colours are trivially separable even for random weights
    assert row["linear"]["top1"] == 1.0 and row["knn"]["top1"] == 1.0
    assert res["datasets"]["colours"]["n_test"] == 15
    assert "| tiny | 100.0 | 100.0 |" in (out / "results.md").read_text()
    assert report["results"][0]["linear"]["top1"] == 1.0
    feats = out / "features" / "tiny" / "colours_train.npy"
    assert np.load(feats, allow_pickle=False).shape == (30, 64)
    # rerun: cached features and probe results are reused (files untouched)
    mtime = feats.stat().st_mtime_ns
    report = ev.main(str(cfg), [])
    assert feats.stat().st_mtime_ns == mtime and report["results"][0] == row
    # a different seed is a different model: features recomputed
    report = ev.main(str(cfg), ["eval.models.0.seed=2"])
    assert feats.stat().st_mtime_ns != mtime and report["results"][0]["extract"]["train"]["images_per_s"] > 0
    # a bad dataset path is one config error (exit code 2) naming it
    with pytest.raises(SystemExit) as e:
        stage_cli("eval", ["--config", str(cfg), f"eval.datasets.0.test={tmp_path}/nope"])
    assert e.value.code == 2


def test_open_clip_and_hf_export_extractors(tmp_path, colour_data):
    """open_clip (random init, no download) and an HF folder saved by our export code both give
    finite features of the right width; the HF folder matches our model's pooled output."""
    from pipeline.core.dist import DistContext
    from training.evaluation.evaluate import ModelSpec
    from training.evaluation.features import build_extractor, extract
    from training.hf import save_hf_folder
    from training.model import ModelConfig, build_model
    ds = open_labeled(str(colour_data / "test"))
    ctx = DistContext()
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_rope2d", image_size=32)
    model = build_model(cfg)
    save_hf_folder(model, cfg, tmp_path / "export")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    hf = extract(build_extractor(ModelSpec(name="h", kind="hf", path=str(tmp_path / "export")),
                                 ctx.device), ds, ctx)
    ours = extract(build_extractor(ModelSpec(name="c", kind="checkpoint", path=str(tmp_path / "bare.pt"),
                                             model={"name": "vit_tiny_rope2d", "image_size": 32}),
                                   ctx.device), ds, ctx)
    assert hf.shape == (15, 64) and np.allclose(hf, ours, atol=1e-4)
    rnd = extract(build_extractor(ModelSpec(name="r", kind="random", path=str(tmp_path / "export"), seed=5),
                                  ctx.device), ds, ctx)
    assert rnd.shape == hf.shape and not np.allclose(rnd, hf, atol=1e-3)
    oc = build_extractor(ModelSpec(name="o", kind="open_clip", arch="ViT-B-32", pretrained=None), ctx.device)
    feats = oc(torch.stack([oc.transform(ds.read(i)) for i in range(2)]))
    assert feats.shape == (2, 512) and torch.isfinite(feats).all()


@pytest.mark.slow
def test_distributed_extraction_equals_one_rank(tmp_path, colour_data):
    """2 ranks under torchrun (each takes a contiguous block of rows, gathered in order) give the
    same features as one in-process rank; 15 test rows do not split evenly (8 + 7)."""
    from pipeline.core.dist import DistContext
    from training.evaluation.evaluate import ModelSpec
    from training.evaluation.features import build_extractor, extract
    cfg = _eval_config(tmp_path, colour_data)
    torchrun(["-m", "training.evaluation.evaluate", "--config", str(cfg)], 2, env={"HF_HUB_OFFLINE": "1"})
    spec = ModelSpec(name="tiny", kind="random", model={"name": "vit_tiny_clip", "image_size": 32}, seed=1)
    ex = build_extractor(spec, torch.device("cpu"))
    for split, n in (("train", 30), ("test", 15)):
        a = np.load(tmp_path / "run" / "eval" / "features" / "tiny" / f"colours_{split}.npy")
        b = extract(ex, open_labeled(str(colour_data / split)), DistContext(), batch_size=4)
        assert a.shape == (n, 64) and np.allclose(a, b, atol=1e-5)
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]
    assert [(r["model"], r["dataset"]) for r in res] == [("tiny", "colours")]
