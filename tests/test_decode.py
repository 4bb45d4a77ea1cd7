"""The fast train-time image path (training/decode.py) against the reference (`decode_image`:
stage 1's decoder + PIL bicubic + float normalisation): same crop plan, same decoded pixels,
and a measured, bounded resize difference. The bounds below are in uint8 levels (0-255) of the
224 px output; what was measured when they were set is written beside each."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipeline.core.config import ConfigError
from pipeline.core.images import ImageError
from training import decode as D
from training.data import CLIP_MEAN, CLIP_STD, TrainDataConfig, decode_batch, normalize_uint8, to_tensor

S = 224


def enc(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def picture(w: int, h: int, seed: int, k: int = 8) -> Image.Image:
    """Smooth random picture (random colours every `k` px, bicubic between them, blurred)."""
    a = np.random.default_rng(seed).integers(0, 256, (max(h // k, 2), max(w // k, 2), 3), dtype=np.uint8)
    return Image.fromarray(a).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def clipart(w: int, h: int, seed: int) -> Image.Image:
    """Hard-edged shapes on white, like the demo's clip art (the worst case for a filter change)."""
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle((x, y, x + int(rng.integers(5, w // 2)), y + int(rng.integers(5, h // 2))),
                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)), outline=(0, 0, 0), width=2)
    return im


def samples() -> dict[str, bytes]:
    """Every kind the decoder repairs, at the demo's <= 256 px, plus large JPEGs (draft)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: upright is 180 wide, 250 high
    pal = picture(200, 160, 4).convert("P")
    pal.info["transparency"] = 3
    rgba = picture(230, 170, 5).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((230, 170)))
    out = {f"jpg{i}": enc(picture(256 - 20 * i, 150 + 25 * i, i), quality=85) for i in range(4)}
    out.update({
        "jpg_exif": enc(picture(250, 180, 6), exif=exif),
        "jpg_gray": enc(picture(240, 200, 7).convert("L")),
        "jpg_cmyk": enc(picture(200, 240, 8).convert("CMYK")),
        "png16": enc(Image.fromarray((np.asarray(picture(220, 200, 9).convert("L"), np.uint16) * 257)), "PNG"),
        "gif": enc(pal, "GIF", transparency=3),
        "png_alpha": enc(rgba, "PNG"),
        "bmp": enc(picture(210, 190, 10), "BMP"),
    })
    out.update({f"clipart{i}": enc(clipart(256 - 30 * i, 200 + 20 * i, 30 + i), quality=90) for i in range(3)})
    return out


def big_jpegs() -> list[bytes]:
    """Features every 32 px at 1600 px (~5 px at the output), like a photo's scale."""
    return [enc(picture(1600 + 100 * i, 1200, 20 + i, k=32), quality=90) for i in range(4)]


def levels(x: torch.Tensor) -> torch.Tensor:
    """Reference float output back to uint8 levels (exact: the reference resize gives uint8)."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((x * std + mean) * 255).round()


def both(datas: list[bytes], seed: int = 5, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    ref = decode_batch(datas, S, TrainDataConfig(fast=False, **kw), np.random.default_rng(seed))
    fast = decode_batch(datas, S, TrainDataConfig(**kw), np.random.default_rng(seed))
    assert ref.dtype == torch.float32 and fast.dtype == torch.uint8 and ref.shape == fast.shape
    return levels(ref), fast.float()


def test_normalize_uint8_is_to_tensor_bit_for_bit():
    a = np.random.default_rng(0).integers(0, 256, (2, 31, 17, 3), dtype=np.uint8)
    want = torch.stack([to_tensor(Image.fromarray(x)) for x in a])
    got = normalize_uint8(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert normalize_uint8(torch.from_numpy(a).permute(0, 3, 1, 2), torch.bfloat16).dtype == torch.bfloat16


def test_same_plan_as_the_reference():
    """Same crop boxes and flips: the generator is consumed identically (the next draw agrees),
    and with a nearest-pixel look at the boxes the plans are the reference's."""
    datas = list(samples().values())
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    decode_batch(datas, S, TrainDataConfig(fast=False), r1)
    decode_batch(datas, S, TrainDataConfig(), r2)
    assert r1.random() == r2.random()


def test_in_place_resize_and_mirror_order():
    """The CPU fast path resizes straight into a channels-last batch row and mirrors the crop
    before resizing; the same pixels as resizing first and mirroring the output (measured: 0 levels
    on these samples and the bench's 300 demo JPEGs; bound 1 for the filter's float centres)."""
    out = D.batch_buffer(2, S)
    assert out.shape == (2, 3, S, S) and out.is_contiguous(memory_format=torch.channels_last)
    for data in [d for n, d in samples().items() if n.startswith(("jpg", "clipart")) and n != "jpg_cmyk"]:
        x = D._decode_jpeg(data)[None]
        h, w = x.shape[-2:]
        for box in ((0, 0, w, h), (3, 5, w // 2 + 7, h // 2 + 1), (w // 3, 1, w - 2, h - 4)):
            for flip in (False, True):
                got = D.resize_crop(x, box, flip, S, out=out[1])
                assert got.data_ptr() == out[1].data_ptr()
                want = D.resize_crop(x, box, False, S)
                want = want.flip(-1) if flip else want
                assert (got.int() - want.int()).abs().max() <= 1, (box, flip)


def test_jpeg_header_agrees_with_pillow():
    """The fast path skips Pillow's open for plain JPEGs (`jpeg_header`): where it answers, it is
    Pillow's size and a mode decode_jpeg reads as Pillow does, upright; EXIF-rotated, CMYK,
    non-JPEG and damaged headers get None (Pillow then opens them, as before)."""
    from pipeline.core.images import orientation
    plain = {}
    for name, data in {**samples(), "big": big_jpegs()[0]}.items():
        im = Image.open(io.BytesIO(data))
        hdr = D.jpeg_header(data) if data[:3] == D.JPEG_MAGIC else None
        if im.format == "JPEG" and im.mode in ("RGB", "L") and orientation(im) == 1:
            assert hdr == (*im.size, len(im.mode)), name
            plain[name] = data
        else:
            assert hdr is None, name
    assert len(plain) == 9 and "jpg_gray" in plain
    exif1 = Image.Exif()
    exif1[0x0112] = 1  # upright EXIF: still plain
    data = enc(picture(120, 90, 3), exif=exif1)
    assert D.jpeg_header(data) == (120, 90, 3)
    good = plain["jpg0"]
    sof = good.index(b"\xff\xc0")
    for bad in (good[:sof + 6],                       # cut inside the frame header
                good[:2] + b"junk" + good[2:],         # junk where a marker belongs
                good[:sof + 4] + b"\x0c" + good[sof + 5:],  # 12-bit samples
                good[:sof + 9] + b"\x04" + good[sof + 10:]):  # 4 components
        assert D.jpeg_header(bad) is None


def test_fast_path_pixels_vs_reference_small():
    """<= 256 px (no draft): the decode is the same; only the resize differs: torch's antialiased
    bicubic (same a = -0.5 kernel as Pillow's) stops at the crop box's edge, where Pillow's filter
    also reads the pixels just outside it, so hard edges there differ. Measured on these samples:
    max 26 levels of 255 (clip art at the crop border; 14 beyond its outer 4 px), mean 0.05,
    > 2 levels on 0.12% of values (the 300 demo JPEGs, training/bench_data.py's shards: max 80 at
    the border, 18 beyond 4 px, mean 0.043, 0.32%). Bound: mean <= 0.3, > 2 levels on < 1%,
    <= 32 beyond the outer 4 px, <= 128 anywhere."""
    ref, fast = both(list(samples().values()))
    d = (ref - fast).abs()
    assert d.mean() <= 0.3 and (d > 2).float().mean() < 0.01, (d.mean(), (d > 2).float().mean())
    assert d[..., 4:-4, 4:-4].max() <= 32 and d.max() <= 128, d.max()


def test_fast_path_pixels_vs_reference_draft():
    """Large JPEGs whose crop box is >= 2x the output: decoded at a DCT scale of 1/2-1/8 (as stage
    1 does with `draft`), then Pillow-resized. Measured: max 4 levels, mean 0.47 (features every
    8 px instead of 32: max 15, mean 1.95); bound: max <= 24, mean <= 1.5."""
    datas = big_jpegs()
    rng = np.random.default_rng(5)
    scales = []
    for data in datas:
        im, _, plan = D.open_and_plan(data, S, 0.5, 0.5, rng)
        scales.append(D.draft_scale(plan.box, S))
    assert max(scales) > 1, scales  # the draft branch really ran
    ref, fast = both(datas)
    d = (ref - fast).abs()
    assert d.mean() <= 1.5 and d.max() <= 24, (d.max(), d.mean())
    ref, nodraft = levels(decode_batch(datas, S, TrainDataConfig(fast=False), np.random.default_rng(5))), \
        D.decode_batch_cpu(datas, S, 0.5, 0.5, np.random.default_rng(5), draft=False).float()
    assert (ref - nodraft).abs().mean() <= 0.3  # without draft: the small-image bound


def test_torchvision_jpeg_decode_equals_pillow():
    """The CPU fast path decodes upright RGB/grayscale JPEGs with torchvision: same pixels as
    pipeline/core/images.py's decode (same libjpeg-turbo settings), so only the resize differs."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.core.images import decode_rgb
    for name, data in samples().items():
        if not name.startswith("jpg") or name in ("jpg_exif", "jpg_cmyk"):
            continue
        tv = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(tv, torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)), name


def test_gpu_path_split_and_pixels_on_cpu():
    """decode=gpu's batch path, run with torchvision's decode_jpeg on the CPU device: PNG, GIF,
    BMP, CMYK and EXIF-rotated samples are decoded by the worker (CPU path), the rest travel
    encoded; the result equals the CPU fast path (measured: 0 levels; bound 1 for float rounding)."""
    s = samples()
    enc = D.plan_batch(list(s.values()), S, 0.5, 0.5, np.random.default_rng(5))
    on_gpu = {list(s)[i] for i in enc.jpeg_rows.tolist()}
    assert on_gpu == {"jpg0", "jpg1", "jpg2", "jpg3", "jpg_gray", "clipart0", "clipart1", "clipart2"}
    got = D.decode_on_device(enc, "cpu").float()
    want = D.decode_batch_cpu(list(s.values()), S, 0.5, 0.5, np.random.default_rng(5)).float()
    assert (got - want).abs().max() <= 1
    ref, _ = both(list(s.values()))
    assert (got - ref).abs().mean() <= 0.3


def test_gpu_path_falls_back_per_image():
    """A JPEG torchvision refuses in the batch: retried alone, then Pillow's verdict (here a
    truncated file: ImageError, as the reference path raises)."""
    good = enc(picture(200, 200, 1))
    enc_b = D.plan_batch([good, good], S, 0.5, 0.0, np.random.default_rng(1))
    enc_b.jpegs[1] = enc_b.jpegs[1][:200].clone()
    with pytest.raises(ImageError):
        D.decode_on_device(enc_b, "cpu")
    with pytest.raises(ImageError):
        D.decode_batch_cpu([good[:200]], S, 0.5, 0.5, np.random.default_rng(1))


def test_decode_setting_is_validated():
    with pytest.raises(ConfigError, match="decode"):
        TrainDataConfig(decode="tpu")
    with pytest.raises(ConfigError, match="fast"):
        TrainDataConfig(decode="gpu", fast=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            TrainDataConfig(decode="gpu")


class _InWorker(torch.utils.data.IterableDataset):
    """`decode_batch` as a DataLoader worker runs it (fast and decode=gpu's plan), with whether the
    batch was already in shared memory before the worker handed it over."""

    def __init__(self, datas: list[bytes]):
        self.datas = datas

    def __iter__(self):
        fast = decode_batch(self.datas, S, TrainDataConfig(), np.random.default_rng(11))
        plan = D.plan_batch(self.datas, S, 0.5, 0.5, np.random.default_rng(11), shared=True)
        yield fast, fast.is_shared(), plan.images.is_shared()


def test_worker_batches_are_made_in_shared_memory():
    """A worker's fast batch is allocated in shared memory (torch's queue then sends its file
    descriptor instead of copying 150 KB an image into a new segment); in the training process
    it is private. Same pixels, same channels-last layout either way."""
    datas = list(samples().values())
    dl = torch.utils.data.DataLoader(_InWorker(datas), batch_size=None, num_workers=1)
    (got, shared_fast, shared_plan), = list(dl)
    assert shared_fast and shared_plan
    here = decode_batch(datas, S, TrainDataConfig(), np.random.default_rng(11))
    assert not here.is_shared()
    assert got.is_contiguous(memory_format=torch.channels_last) and here.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, here)


def test_draft_box_stays_inside_the_drafted_picture():
    """A drafted JPEG's size rounds up per axis (253 x 152 at 1/4 is 64 x 38): the crop box is
    scaled by the DCT scale itself. Scaled by the rounded width's ratio (64 / 253), a full-height
    box ended 0.45 px below the picture and Pillow refused it ("box can't exceed original image
    size"), which stopped the loader on such a JPEG. Measured when set, at this 32 px output:
    mean 1.49-1.75, max 7-13 levels from the undrafted decode."""
    data = enc(picture(253, 152, 3), quality=90)
    for box in [(0, 0, 253, 152), (3, 0, 250, 152), (0, 1, 253, 151)]:
        plan = D.Plan(box, False)
        assert D.draft_scale(box, 32) == 4
        drafted = D.decode_cpu(None, plan, 32, True, data).float()
        full = D.decode_cpu(None, plan, 32, False, data).float()
        assert drafted.shape == (3, 32, 32)
        assert (drafted - full).abs().mean() <= 2.5 and (drafted - full).abs().max() <= 24
