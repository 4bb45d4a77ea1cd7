"""Bounded memory on hostile pictures (issue 26): a legal 1 x 65,535 PNG of a few hundred bytes
would need ~13 GB once stage 1 resizes its shortest side to 224 px. pipeline/core/images.py refuses
extreme aspect ratios from the header (`extreme_aspect`, counted like every skip) before any
pixel is decoded; the peak memory of every stage's path on that file is measured in a fresh
process (ru_maxrss) and must stay within 200 MB of the process's baseline."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import ConfigError
from pipeline.core.images import MAX_ASPECT, load_rgb

ROOT = Path(__file__).resolve().parents[1]


def strip_png(w: int, h: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(b, "PNG", optimize=True)
    return b.getvalue()


def test_extreme_aspect_is_skipped_from_the_header():
    data = strip_png(1, 65_535)
    assert len(data) < 2_000  # a few hundred bytes
    assert load_rgb(data) == (None, "extreme_aspect")
    assert load_rgb(strip_png(65_535, 1)) == (None, "extreme_aspect")
    ok, fixes = load_rgb(strip_png(int(MAX_ASPECT) * 10, 10))  # exactly at the cap: kept
    assert ok is not None and ok.size == (int(MAX_ASPECT) * 10, 10) and fixes == []
    assert load_rgb(strip_png(int(MAX_ASPECT) * 10 + 1, 10))[1] == "extreme_aspect"
    im, _ = load_rgb(data, max_aspect=0)  # 0 = no cap: decodes (196 KB of pixels)
    assert im is not None and im.size == (1, 65_535)


def test_max_aspect_setting_is_validated():
    from pipeline.embed import EmbedConfig
    assert EmbedConfig().max_aspect == MAX_ASPECT
    for bad in (0.5, -1, float("nan")):
        with pytest.raises(ConfigError, match="max_aspect"):
            EmbedConfig(max_aspect=bad)


PROBE = r"""
import json, resource, sys
import numpy as np
from pipeline.embed import EmbedConfig
from pipeline.encoders import image_transform
from pipeline.core.images import load_rgb
from training import decode
from training.data import TrainDataConfig, decode_batch
data = open(sys.argv[1], "rb").read()
preprocess = image_transform(224, (0.5,) * 3, (0.5,) * 3)
load_rgb(b"", 1)  # warm imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = EmbedConfig()
img, why = load_rgb(data, cfg.max_pixels, 224, cfg.max_aspect)  # stage 1's call
if img is not None:
    preprocess(img)
out = {"stage1": why}
# stage 3 (both paths) crops before it resizes: no cap needed, bounded by the crop
for fast in (False, True):
    x = decode_batch([data], 224, TrainDataConfig(fast=fast), np.random.default_rng(0))
    out[f"train_fast_{fast}"] = list(x.shape)
enc = decode.plan_batch([data], 224, 0.5, 0.5, np.random.default_rng(0))
out["gpu_plan_cpu_rows"] = len(enc) - len(enc.jpegs)
out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


def test_peak_memory_on_a_1x65535_png(tmp_path):
    f = tmp_path / "strip.png"
    f.write_bytes(strip_png(1, 65_535))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(f)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stage1"] == "extreme_aspect"
    assert out["train_fast_False"] == out["train_fast_True"] == [1, 3, 224, 224]
    assert out["gpu_plan_cpu_rows"] == 1  # a PNG: the worker's CPU path
    assert out["peak_mb"] < 200, out


def test_aspect_cap_bounds_the_stage1_resize():
    """At the cap, stage 1's shortest-side resize holds S^2 x MAX_ASPECT pixels: 224 px, 4.8 MB."""
    from pipeline.encoders import image_transform
    im, _ = load_rgb(strip_png(int(MAX_ASPECT) * 12, 12))
    x = image_transform(224, (0.5,) * 3, (0.5,) * 3)(im)
    assert tuple(x.shape) == (3, 224, 224)
    assert 224 * 224 * MAX_ASPECT * 3 < 5e6 and np.isfinite(x.numpy()).all()
