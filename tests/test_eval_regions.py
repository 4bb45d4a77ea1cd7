"""Region evaluation (RICE): box -> patch cells, the processor's geometry, region features that
see exactly the patches of their box, and `mlcd eval-regions` end to end on tiny probe scenes
(a random-init model and the same weights exported to an HF folder)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.core.dist import DistContext
from pipeline.core.shards import ShardWriter, encode_image
from training.evaluation import regions as R
from training.evaluation.features import EvalInputError, build_extractor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = {"name": "vit_tiny_clip", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
        "mlp_dim": 64, "embed_dim": 0}


def test_cell_mask_and_pooling_take_exactly_the_cells_a_box_overlaps():
    g = torch.randn(4, 4, 6, dtype=torch.float64)
    boxes = torch.tensor([[9, 9, 20, 15],     # rows {1}, cols {1, 2}
                          [10, 10, 11, 11],   # inside one cell: (1, 1)
                          [8, 8, 8, 8],       # zero area on a cell corner: the cell of its center
                          [-5, -5, 4, 4],     # partly outside: (0, 0)
                          [40, 40, 50, 50]], dtype=torch.float64)  # outside the 32 x 32 input
    mask, kept = R.cell_mask(boxes, 4, 4, 8)
    want = [{(1, 1), (1, 2)}, {(1, 1)}, {(1, 1)}, {(0, 0)}, set()]
    for m, w in zip(mask, want):
        assert {tuple(ix) for ix in m.nonzero().tolist()} == w
    assert kept.tolist() == [True, True, True, True, False]
    f, k = R.pool_regions(g, boxes, 8)
    ref = torch.nn.functional.normalize((g[1, 1] + g[1, 2]) / 2, dim=0)
    assert torch.allclose(f[0], ref) and torch.allclose(f[1], torch.nn.functional.normalize(g[1, 1], dim=0))
    assert (f[4] == 0).all() and torch.allclose(f[:4].norm(dim=1), torch.ones(4, dtype=torch.float64))
    g2 = g.clone()
    g2[0], g2[2:], g2[1, 0], g2[1, 3] = 5.0, -3.0, 7.0, 9.0   # every cell box 0 does not overlap
    assert torch.allclose(R.pool_regions(g2, boxes[:1], 8)[0], f[:1])
    g2[1, 2] += 1.0
    assert not torch.allclose(R.pool_regions(g2, boxes[:1], 8)[0], f[:1])


def _proc():
    from transformers import CLIPImageProcessor

    from training.hf import processor_config
    from training.model import ModelConfig
    cfg = ModelConfig(**TINY)
    return CLIPImageProcessor(**{k: v for k, v in processor_config(cfg).items() if k != "image_processor_type"})


@pytest.mark.parametrize("w,h,box", [(80, 40, (40, 10, 50, 20)), (40, 75, (10, 40, 20, 50)),
                                     (45, 45, (9, 9, 18, 18)), (32, 32, (4, 20, 12, 30))])
def test_box_geometry_follows_the_processors_resize_and_crop(w, h, box):
    proc = _proc()
    a = np.zeros((h, w, 3), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    x = proc(images=Image.fromarray(a), return_tensors="pt")["pixel_values"][0]
    ys, xs = (x[0] > 0.5).nonzero().T
    sx, sy, ox, oy = R.box_geometry(proc, w, h)
    mapped = (box[0] * sx - ox, box[1] * sy - oy, box[2] * sx - ox, box[3] * sy - oy)
    seen = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    assert np.allclose(mapped, seen, atol=1.0), (mapped, seen)


def _write_scenes(folder, scenes):
    """scenes: [(key, PIL image, [(box, kind, label)])] -> 00000.tar + gt_00000.parquet."""
    folder.mkdir(parents=True)
    w = ShardWriter(folder, 0)
    for key, img, _ in scenes:
        data, ext = encode_image(img, "png")
        w.write(key, data, ext, "a scene", {})
    w.close()
    pq.write_table(pa.table({
        "key": [k for k, _, _ in scenes],
        "boxes": pa.array([[list(map(float, b)) for b, _, _ in regs] for _, _, regs in scenes],
                          pa.list_(pa.list_(pa.float64()))),
        "kind": [[k for _, k, _ in regs] for _, _, regs in scenes],
        "label": [[lab for _, _, lab in regs] for _, _, regs in scenes]}), folder / "gt_00000.parquet")


def _token_local(ex):
    """Attention and MLP outputs zeroed: every patch token then depends on its own patch only, so
    a region feature may change only with the pixels of the cells its box overlaps."""
    with torch.no_grad():
        for layer in ex.module.vision_model.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    return ex


@pytest.mark.parametrize("size", [32, 64])  # 64: resized to the model's 32 (boxes scaled too)
def test_region_features_see_only_the_pixels_of_their_cells(tmp_path, size):
    rng = np.random.default_rng(0)
    s = size // 32  # image pixels per input pixel
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    box = (9 * s, 9 * s, 20 * s, 15 * s)                 # input cells: row 1, cols 1-2 -> [8, 24) x [8, 16)
    outside = base.copy()
    keep = np.zeros((size, size), bool)
    keep[(8 - 2) * s:(16 + 2) * s, (8 - 2) * s:(24 + 2) * s] = True  # 2-px margin: bicubic support
    outside[~keep] = rng.integers(0, 256, (int((~keep).sum()), 3), dtype=np.uint8)
    inside = base.copy()
    inside[10 * s:12 * s, 10 * s:12 * s] = 255 - inside[10 * s:12 * s, 10 * s:12 * s]
    regs = [(box, "object", "thing")]
    _write_scenes(tmp_path / "s", [(f"{i:05d}", Image.fromarray(a), regs)
                                   for i, a in enumerate((base, outside, inside))])
    rs = R.open_regions(str(tmp_path / "s"))
    spec = R.ModelSpec(name="r", kind="random", model=TINY)
    ex = _token_local(build_extractor(spec, torch.device("cpu")))
    f, kept = R.extract_regions(ex, rs, DistContext(), batch_size=2)
    assert f.shape == (3, 32) and kept.all() and np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)
    assert np.allclose(f[0], f[1], atol=1e-6)            # pixels outside the box's cells changed
    assert not np.allclose(f[0], f[2], atol=1e-3)        # pixels inside the box changed
    # with attention on, context leaks into every token: the test above is not vacuous
    f_full, _ = R.extract_regions(build_extractor(spec, torch.device("cpu")), rs, DistContext())
    assert not np.allclose(f_full[0], f_full[1], atol=1e-6)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _word(label, w, h):
    a = np.full((h, w, 3), 255, np.uint8)
    if label == "stop":
        a[np.arange(h) % 8 < 4] = 0   # thick horizontal strokes
    else:
        a[:, np.arange(w) % 8 < 6] = 0  # thicker vertical strokes (darker overall)
    return a


def _probe_scenes(folder, n, seed):
    """48 x 48 scenes: two coloured squares (category = colour) at random places in the top half,
    one 'word' (a stroke pattern, label stop | go) in the bottom half."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        a = np.full((48, 48, 3), 128, np.uint8)
        regs = []
        for x_lo in (0, 24):
            name = list(COLOURS)[rng.integers(3)]
            side = int(rng.integers(12, 20))
            x0, y0 = x_lo + int(rng.integers(0, 24 - side + 1)), int(rng.integers(0, 24 - side + 1))
            a[y0:y0 + side, x0:x0 + side] = COLOURS[name]
            regs.append(((x0, y0, x0 + side, y0 + side), "object", name))
        word = ["stop", "go"][i % 2]
        x0, y0 = int(rng.integers(0, 8)), int(rng.integers(26, 34))
        a[y0:y0 + 12, x0:x0 + 40] = _word(word, 40, 12)
        regs.append(((x0, y0, x0 + 40, y0 + 12), "ocr", word))
        scenes.append((f"{seed:02d}{i:03d}", Image.fromarray(a), regs))
    _write_scenes(folder, scenes)


def test_eval_regions_writes_results_for_a_separable_case_and_reuses_its_cache(tmp_path):
    from training.hf import save_hf_folder
    from training.model import ModelConfig, build_model
    _probe_scenes(tmp_path / "probe/train", 30, 1)
    _probe_scenes(tmp_path / "probe/test", 12, 2)
    torch.manual_seed(0)  # the random kind's init with seed 0: the export holds the same weights
    save_hf_folder(build_model(ModelConfig(**TINY)), ModelConfig(**TINY), tmp_path / "export")
    models = json.dumps([{"name": "random_init", "kind": "random", "model": TINY, "seed": 0},
                         {"name": "exported", "kind": "hf", "path": str(tmp_path / "export")}])
    over = [f"run.out_dir={tmp_path}", f"eval_regions.train={tmp_path}/probe/train",
            f"eval_regions.test={tmp_path}/probe/test", f"eval_regions.models={models}",
            "eval_regions.workers=0", "eval_regions.linear.c_grid=[0.1,1.0,10.0]"]
    report = R.main(None, over)
    out = tmp_path / "eval_regions"
    rows = {(r["model"], r["task"]): r for r in report["results"]}
    assert set(rows) == {(m, t) for m in ("random_init", "exported") for t in ("object", "word")}
    for (m, t), r in rows.items():
        assert r["counts"]["n_train"] == (60 if t == "object" else 30), (m, t, r["counts"])
        assert r["counts"]["n_test"] == (24 if t == "object" else 12)
        assert r["counts"]["classes"] == (3 if t == "object" else 2)
        assert r["linear"]["top1"] >= 0.9 and r["knn"]["top1"] >= 0.9, (m, t, r["linear"]["top1"], r["knn"]["top1"])
    # the HF folder's patch tokens (transformers' CLIPVisionModel) are our model's
    a = np.load(out / "features/random_init/regions_train.npy")
    b = np.load(out / "features/exported/regions_train.npy")
    assert a.shape == (90, 32) and np.allclose(a, b, atol=1e-4)
    md = (out / "results.md").read_text()
    assert "| model | feature | object linear | object k-NN | word linear | word k-NN |" in md
    # neither model has region layers: their region-head rows say so, no region_head features
    assert "| exported | region head: none (no region layers) |" in md
    assert {r["feature"] for r in report["results"]} == {"patch_mean"}
    assert "object: 60 train / 24 test regions, 3 classes" in md
    assert json.loads((out / "results.json").read_text())["results"] == report["results"]
    # a rerun reuses the features and the probe rows
    mtime = (out / "features/exported/regions_test.npy").stat().st_mtime_ns
    again = R.main(None, over)
    assert (out / "features/exported/regions_test.npy").stat().st_mtime_ns == mtime
    assert again["results"] == report["results"]


def test_region_head_embeddings_of_a_rice_export(tmp_path):
    """An export with RICE's region head is probed twice: pooled patch tokens and the head's own
    region embeddings (one row per box, the head's forward on the processed image, not the pooled
    feature); a model without region layers keeps the pooled row only."""
    from training.export import save_region_head
    from training.hf import save_hf_folder
    from training.model import ModelConfig
    from training.regions import MLCDRegionEncoder, RegionHeadConfig
    _probe_scenes(tmp_path / "probe/train", 12, 1)
    _probe_scenes(tmp_path / "probe/test", 6, 2)
    cfg = ModelConfig(**{**TINY, "name": "vit_tiny_rope2d", "embed_dim": 16})
    torch.manual_seed(0)
    model = MLCDRegionEncoder(cfg, RegionHeadConfig(layers=1)).eval()
    sd = {k[len("region_head."):]: v for k, v in model.state_dict().items() if k.startswith("region_head.")}
    save_hf_folder({k: v for k, v in model.state_dict().items() if not k.startswith("region_head.")}, cfg,
                   tmp_path / "export")
    save_region_head(sd, cfg.resolved(), {}, tmp_path / "export", torch.float32, tmp_path)
    models = json.dumps([{"name": "rice", "kind": "hf", "path": str(tmp_path / "export")},
                         {"name": "random_init", "kind": "random", "model": TINY, "seed": 0}])
    over = [f"run.out_dir={tmp_path}", f"eval_regions.train={tmp_path}/probe/train",
            f"eval_regions.test={tmp_path}/probe/test", f"eval_regions.models={models}",
            "eval_regions.workers=0", "eval_regions.linear.c_grid=[1.0]", "eval_regions.knn.ks=[1,5]"]
    report = R.main(None, over)
    keys = {(r["model"], r["feature"], r["task"]) for r in report["results"]}
    assert keys == {("rice", f, t) for f in ("patch_mean", "region_head") for t in ("object", "word")} | {
        ("random_init", "patch_mean", t) for t in ("object", "word")}
    assert report["models"]["rice"]["features"] == ["patch_mean", "region_head"]
    feats = tmp_path / "eval_regions/features/rice"
    head, pooled = np.load(feats / "region_head_train.npy"), np.load(feats / "regions_train.npy")
    assert head.shape == (36, 16) and pooled.shape == (36, 32)  # one row per box: 12 scenes x 3
    assert np.allclose(np.linalg.norm(head, axis=1), 1, atol=1e-5)
    # the head's rows are its forward on the processed image and the mapped boxes
    rs = R.open_regions(str(tmp_path / "probe/train"))
    ex = build_extractor(R.ModelSpec(name="r", kind="hf", path=str(tmp_path / "export")), torch.device("cpu"))
    img = rs.images.with_transform(ex.transform)[0][0]  # 48 px scene -> 32 px input
    boxes = torch.as_tensor(rs.boxes[:3], dtype=torch.float32) * 32 / 48
    with torch.no_grad():
        _, want = model(img[None], boxes[None], torch.ones(1, 3, dtype=torch.bool))
    assert np.allclose(head[:3], torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-4)
    assert not np.allclose(head[0], head[1], atol=1e-3)  # each box its own embedding
    md = (tmp_path / "eval_regions/results.md").read_text()
    assert "| rice | region head |" in md and "| rice | patch mean |" in md
    assert "| random_init | region head: none (no region layers) |" in md


def test_bad_ground_truth_is_one_line_naming_the_file(tmp_path):
    _probe_scenes(tmp_path / "p", 2, 0)
    gt = tmp_path / "p/gt_00000.parquet"
    t = pq.read_table(gt).to_pylist()
    t[1]["key"] = "nope"
    pq.write_table(pa.Table.from_pylist(t), gt)
    with pytest.raises(EvalInputError, match="gt_00000.parquet: key 'nope'") as e:
        R.open_regions(str(tmp_path / "p"))
    assert "\n" not in str(e.value)
    t[1]["key"], t[1]["boxes"][0] = "00001", [30.0, 5.0, 10.0, 9.0]  # key restored; x1 < x0
    pq.write_table(pa.Table.from_pylist(t), gt)
    with pytest.raises(EvalInputError, match="gt_00000.parquet: key '00001': bad region"):
        R.open_regions(str(tmp_path / "p"))
    from pipeline.core.config import ConfigError
    with pytest.raises(ConfigError, match="models.0.kind"):
        R.RegionEvalConfig(models=[{"name": "c", "kind": "open_clip", "arch": "ViT-B-32"}])


@pytest.mark.parametrize("name", ["vit_tiny_clip", "vit_tiny_rope2d"])
def test_hf_export_gives_our_patch_tokens(tmp_path, name):
    """CLIPVisionModel / MLCDVisionModel read back with transformers: the same patch grid (class
    token dropped, raster order) as our model with the same weights."""
    from training.hf import save_hf_folder
    from training.model import ModelConfig, build_model
    cfg = {**TINY, "name": name}
    torch.manual_seed(0)
    save_hf_folder(build_model(ModelConfig(**cfg)), ModelConfig(**cfg), tmp_path)
    ours = build_extractor(R.ModelSpec(name="r", kind="random", model=cfg, seed=0), torch.device("cpu"))
    hf = build_extractor(R.ModelSpec(name="h", kind="hf", path=str(tmp_path)), torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    a, b = ours.patch_tokens(x), hf.patch_tokens(x)
    assert a.shape == (2, 4, 4, 32) and torch.allclose(a, b, atol=1e-5)
    # raster order: token (r, c) is the patch at rows 8r.., cols 8c.. (a change there moves it most)
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] += 3.0
    diff = (ours.patch_tokens(x2) - a).norm(dim=-1)[0]
    assert diff.argmax().item() == 1 * 4 + 2


def test_probe_split_with_many_small_classes():
    """Words: many classes with 2-3 regions each. A stratified validation split smaller than the
    class count is refused by scikit-learn; the probe falls back to a plain split."""
    from training.evaluation import probe
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(40), 2)
    x = rng.normal(size=(40, 8))[y] * 5 + rng.normal(size=(80, 8))
    tr, va = probe.val_split(y, 0.2, 0)
    assert len(va) == 16 and len(set(tr) | set(va)) == 80
    lin = probe.linear_probe(x, y, x, y, c_grid=(1.0,), val_fraction=0.2)
    assert lin["top1"] > 0.9


@pytest.mark.slow
def test_two_rank_extraction_equals_one_rank(tmp_path):
    """5 scenes over 2 ranks (3 + 2 images, unequal region counts): the gathered region features
    equal a 1-rank run's."""
    from conftest import torchrun
    _probe_scenes(tmp_path / "probe/train", 5, 1)
    _probe_scenes(tmp_path / "probe/test", 3, 2)
    models = json.dumps([{"name": "r", "kind": "random", "model": TINY}])
    over = [f"eval_regions.train={tmp_path}/probe/train", f"eval_regions.test={tmp_path}/probe/test",
            f"eval_regions.models={models}", "eval_regions.workers=0", "eval_regions.knn.ks=[1,3]",
            "eval_regions.linear.c_grid=[1.0]", "eval_regions.device=cpu"]
    torchrun(["-m", "training.evaluation.regions", f"run.out_dir={tmp_path}/two", *over], 2, timeout=300)
    R.main(None, [f"run.out_dir={tmp_path}/one", *over])
    for split, n in (("train", 15), ("test", 9)):
        a = np.load(tmp_path / f"one/eval_regions/features/r/regions_{split}.npy")
        b = np.load(tmp_path / f"two/eval_regions/features/r/regions_{split}.npy")
        assert a.shape == (n, 32) and np.allclose(a, b, atol=1e-5)
    assert (tmp_path / "two/eval_regions/results.md").is_file()
