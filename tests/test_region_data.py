"""training/region_data.py: image + region batches joined by key, resumable like training/data.py."""
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.core.io import atomic_save_npy
from pipeline.core.shards import ShardWriter
from pipeline.core.store import labels_path, write_labels, write_part
from training.data import TrainDataConfig
from training.model import CLIP_MEAN, CLIP_STD
from training.region_data import (
    RegionSpec,
    find_region_parts,
    load_part_regions,
    make_region_loader,
    region_num_classes,
)

W, H, S, K, V = 48, 32, 32, 5, 7  # stored scene size, model input, colour classes, extra "token" ids
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])


def build(root, shards=3, per_shard=8, seed=0):
    """Scenes W x H: black, coloured rectangles (class = colour) in the cells of a 4 x 2 grid; the
    region store (spec layout, written with pipeline/core/store.py) lists them, the region label store
    labels them [c, -1] (objects) or [K + t, -1]... (a few "OCR" rows). The image label is the
    image's global index, so a test can find every batch row's truth. Image 1 of each shard has 5
    labeled regions (> R), image 2 none, image 3 one region with an all -1 label row. The last
    shard has no region part."""
    rng = np.random.default_rng(seed)
    truth = {}
    data, store = root / "data" / "train", root / "store"
    for s in range(shards):
        w = ShardWriter(data, s)
        keys, rows = [], []
        for i in range(per_shard):
            idx, key = s * per_shard + i, f"{s:05d}{i:04d}"
            img = np.zeros((H, W, 3), np.uint8)
            n = {1: 5, 2: 0, 3: 1}.get(i, int(rng.integers(1, 4)))
            cells = rng.permutation(8)[:n]
            regs = []
            for j, cell in enumerate(cells):
                cx, cy = (cell % 4) * 12, (cell // 4) * 16
                x0, y0 = cx + int(rng.integers(0, 3)), cy + int(rng.integers(0, 4))
                x1, y1 = x0 + int(rng.integers(8, 10)), y0 + int(rng.integers(9, 12))
                c = int(rng.integers(K))
                img[y0:y1, x0:x1] = PALETTE[c]
                if i == 3:
                    lab = [-1, -1]
                elif j == 0 and i % 2 == 0:
                    lab = [K + int(rng.integers(V)), K + int(rng.integers(V))]  # an "OCR" region
                else:
                    lab = [c, -1]
                regs.append(((x0, y0, x1, y1), c, lab))
                rows.append({"key": f"{key}.r{j}", "image_key": key, "x0": x0, "y0": y0, "x1": x1,
                             "y1": y1, "img_w": W, "img_h": H, "kind": "object", "text": "",
                             "source": "file", "label": lab})
            truth[idx] = [r for r in regs if r[2][0] >= 0]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            w.write(key, buf.getvalue(), "png", "scene", {"url": f"synthetic://{key}"})
            keys.append(key)
        w.close()
        n = len(keys)
        meta = pa.table({"key": keys, "caption": [""] * n, "url": [""] * n,
                         "shard": [str(data / f"{s:05d}.tar")] * n, "shard_row": list(range(n))})
        write_part(store, s, {"img": np.zeros((n, 4), np.float32)}, meta)
        lab = np.arange(s * per_shard, (s + 1) * per_shard, dtype=np.int32)[:, None]
        write_labels(root / "labels", s, lab, np.ones_like(lab, dtype=np.float16))
        if s == shards - 1:
            continue
        labs = np.asarray([r.pop("label") for r in rows], np.int64)
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        write_part(root / "regions", s, {"img": np.zeros((len(rows), 4), np.float32)}, pa.table(cols))
        atomic_save_npy(labels_path(root / "region_labels", s), labs)
    return truth


def _setup(root, workers=0, per_image=3, hflip=0.5):
    truth = build(root)
    cfg = TrainDataConfig(shards=str(root / "data" / "train"), store=str(root / "store"),
                          labels=str(root / "labels"), batch_size=4, workers=workers, shuffle_buffer=6,
                          hflip=hflip)
    spec = RegionSpec(str(root / "regions"), str(root / "region_labels"), per_image, 2, K + V)
    return truth, cfg, spec, find_region_parts(cfg, spec, 1)


def _load(parts, cfg, spec, **kw):
    args = dict(image_size=S, num_labels=1, num_classes=24, regions=spec, seed=1, rank=0, epoch=2,
                num_batches=6)
    return list(make_region_loader(parts, cfg, **{**args, **kw}))


@pytest.mark.parametrize("workers", [0, 2])
def test_region_stream_resumes_mid_epoch(tmp_path, workers):
    _, cfg, spec, parts = _setup(tmp_path, workers)
    full = _load(parts, cfg, spec)
    part = _load(parts, cfg, spec, start=3)
    assert len(full) == 6 and len(part) == 3
    fields = ("images", "labels", "boxes", "region_labels", "region_valid")
    for a, b in zip(full[3:], part):
        assert a.skipped == b.skipped and a.keys == b.keys and len(a.keys) == 4
        for f in fields:
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    other = _load(parts, cfg, spec, rank=1, num_batches=1)
    assert not torch.equal(other[0].images, full[0].images)  # ranks draw different streams


def test_regions_join_scale_flip(tmp_path):
    truth, cfg, spec, parts = _setup(tmp_path)
    assert [p.region_meta is not None for p in parts] == [True, True, False]
    batches = _load(parts, cfg, spec, num_batches=12)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    seen_flip = seen_plain = subset = 0
    for batch in batches:
        images, labels, boxes, rlab, valid = (batch.images, batch.labels, batch.boxes, batch.region_labels,
                                              batch.region_valid)
        assert images.shape == (4, 3, S, S) and labels.shape == (4, 1)
        assert boxes.shape == (4, 3, 4) and boxes.dtype == torch.float32
        assert rlab.shape == (4, 3, 2) and rlab.dtype == torch.int64 and valid.dtype == torch.bool
        assert (rlab[~valid] == -1).all() and (boxes[~valid] == 0).all()
        for b in range(4):
            idx = int(labels[b, 0])
            want = truth[idx] if idx < 16 else []  # shard 2 has no region part
            n = int(valid[b].sum())
            assert n == min(3, len(want)) and valid[b, :n].all()  # padding at the end
            subset += len(want) > 3
            pix = images[b] * std + mean  # back to [0, 1]
            flips = set()
            for r in range(n):
                cands = [t for t in want if t[2] == rlab[b, r].tolist()]
                assert cands, (idx, rlab[b, r])
                sx, sy = S / W, S / H
                plain = [torch.tensor([x0 * sx, y0 * sy, x1 * sx, y1 * sy], dtype=torch.float32) for (x0, y0, x1, y1), _, _ in cands]
                flipped = [torch.tensor([S - u[2], u[1], S - u[0], u[3]]) for u in plain]
                hit_p = any(torch.allclose(boxes[b, r], u, atol=1e-4) for u in plain)
                hit_f = any(torch.allclose(boxes[b, r], u, atol=1e-4) for u in flipped)
                assert hit_p or hit_f
                flips.add(hit_f and not hit_p)
                # the pixels inside the box have the rectangle's colour (checks the flip too)
                x0, y0, x1, y1 = boxes[b, r].tolist()
                inner = pix[:, int(y0) + 2:int(y1) - 1, int(x0) + 2:int(x1) - 1]
                assert inner.numel() > 0
                colour = torch.tensor(PALETTE[cands[0][1]] / 255.0, dtype=torch.float32)
                assert (inner.mean((1, 2)) - colour).abs().max() < 0.1, (idx, r, inner.mean((1, 2)), colour)
            assert len(flips) <= 1  # one image, one flip
            seen_flip += flips == {True}
            seen_plain += flips == {False}
    assert seen_flip and seen_plain and subset


def test_subset_is_seeded(tmp_path):
    # the 5-region images: which 3 rows a batch takes depends on the batch's generator only
    _, cfg, spec, parts = _setup(tmp_path, hflip=0.0)
    a = _load(parts, cfg, spec)
    b = _load(parts, cfg, spec)
    c = _load(parts, cfg, spec, seed=7)
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(a, b))
    assert not all(x.boxes.shape == y.boxes.shape and torch.equal(x.boxes, y.boxes) for x, y in zip(a, c))


def test_bad_region_inputs(tmp_path):
    _, cfg, spec, parts = _setup(tmp_path)
    # a region label file from another store: row counts differ
    bad = tmp_path / "region_labels" / "labels_0.npy"
    orig = np.load(bad)
    atomic_save_npy(bad, np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"labels_0.npy: shape \(3, 2\) is not row-aligned"):
        load_part_regions(parts[0], spec)
    # labels beyond the label space
    with pytest.raises(ValueError, match="region num_classes"):
        load_part_regions(parts[1], RegionSpec(spec.store, spec.labels, 3, 2, K))
    with pytest.raises(ValueError, match=r"labels_0.npy: shape \(3, 2\) is not row-aligned"):
        find_region_parts(cfg, spec)  # found at start-up, from the headers
    atomic_save_npy(bad, orig)
    # too narrow for num_labels: found at start-up from the header
    with pytest.raises(ValueError, match="train.regions.num_labels needs 3"):
        find_region_parts(cfg, RegionSpec(spec.store, spec.labels, 3, 3, K + V))
    with pytest.raises(FileNotFoundError, match="has regions"):
        find_region_parts(cfg, RegionSpec(str(tmp_path / "none"), spec.labels, 3, 2, K + V))
    with pytest.raises(Exception, match="per_image"):
        RegionSpec(spec.store, spec.labels, 0, 2, K + V)


def test_region_num_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="label_space.json"):
        region_num_classes(tmp_path)
    (tmp_path / "label_space.json").write_text('{"clusters": 5, "tokens": 7, "num_classes": 12}')
    assert region_num_classes(tmp_path) == 12
    (tmp_path / "label_space.json").write_text('{"num_classes": "12"}')
    with pytest.raises(ValueError, match="num_classes"):
        region_num_classes(tmp_path)
