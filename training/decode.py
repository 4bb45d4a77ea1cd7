"""The fast train-time image path: bytes -> uint8 (B, 3, S, S) batches, normalised on the device.

Same picture as stage 1 (pipeline/core/images.py opens, EXIF-rotates and repairs it), same random
resized crop box and flip as training/data.py's `decode_image` (same generator calls in the same
order), but per sample:
- JPEG draft: when the crop box is >= 2x the output size on both sides, the JPEG is decoded at
  the largest DCT scale (1/2, 1/4, 1/8) that keeps the box >= the output (decode cost ~scale^2),
  then Pillow's bicubic resizes the scaled (fractional) box. The demo's <= 256 px pictures never
  qualify; LAION-size ones often do.
- one resize of the crop box, torch's antialiased bicubic on uint8 (the filter of PIL's bicubic,
  a = -0.5, with SIMD kernels), written in place into a preallocated channels-last uint8 batch
  (`batch_buffer`: the kernels' own layout, so no transposing copy): no float image, no
  per-image normalisation (`training.data.normalize_uint8` runs on the device, 4x fewer bytes
  through the worker queue and the host-to-device copy).
Pixel differences from the reference path (`decode_image`, PIL bicubic on the full decode) are
measured and bounded in tests/test_decode.py and stated in the README (train/data).

`decode: gpu` (`plan_batch` in the workers, `decode_on_device` in the training process): the
workers only read headers and draw the boxes; baseline upright JPEGs (RGB or grayscale) go to
`torchvision.io.decode_jpeg` as one batch on the device, then crop/resize/flip there; anything
else (PNG, CMYK, EXIF-rotated, a JPEG decode_jpeg rejects) is decoded on the CPU path above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.images import MAX_PIXELS, ImageError, finish_rgb, open_image, orientation

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class Plan:
    """One sample's crop, drawn from the header alone: box in upright full-size pixels."""
    box: tuple[int, int, int, int]
    flip: bool


def crop_box(w: int, h: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (scale [scale_min, 1], ratio [3/4, 4/3]), from `rng`."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    s = min(w, h)  # fallback: central square
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a plain JPEG -- 8-bit, 1 or 3 components, no EXIF
    orientation other than 1 -- read from its markers up to the first scan; None for anything
    else (EXIF-rotated, CMYK, 12-bit, odd or damaged headers), which Pillow then opens as stage 1
    does. ~35 us instead of Pillow's lazy open + getexif (~120 us a JPEG on the bench)."""
    n, pos, size = len(data), 2, None
    try:
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                return None  # junk between segments: Pillow's more forgiving scan decides
            m = data[pos + 1]
            if m == 0xFF:
                pos += 1  # fill byte
                continue
            if m == 0xDA or m == 0xD9:  # start of scan / end: every header segment has been seen
                break
            if 0xD0 <= m <= 0xD7 or m == 0x01:
                pos += 2
                continue
            seg = int.from_bytes(data[pos + 2:pos + 4], "big")
            body = data[pos + 4:pos + 2 + seg]
            if seg < 2 or len(body) != seg - 2:
                return None
            if m in _SOF:
                if len(body) < 6 or body[0] != 8 or body[5] not in (1, 3):
                    return None
                size = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"), body[5])
            elif m == 0xE1 and body[:6] == b"Exif\0\0" and _exif_orientation(body[6:]) != 1:
                return None
            pos += 2 + seg
        else:
            return None
    except (IndexError, ValueError):
        return None
    if size is None or min(size[:2]) < 1 or size[0] * size[1] > MAX_PIXELS:
        return None
    return size


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 (1 when absent); 0 when the TIFF block cannot be read."""
    if tiff[:2] not in (b"II", b"MM"):
        return 0
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    if ifd < 8 or ifd + 2 + 12 * count > len(tiff):
        return 0
    for e in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
            return int.from_bytes(tiff[e + 8:e + 10], order)
    return 1


def open_and_plan(data: bytes, size: int, scale_min: float, hflip: float, rng: np.random.Generator):
    """(opened image, its orientation, Plan). The generator is used exactly as `decode_image` uses
    it (crop_box on the upright size, then one draw for the flip), so the box and flip match.
    A plain JPEG (`jpeg_header`) is not opened at all: the image is None and decode_jpeg reads it."""
    hdr = jpeg_header(data) if data[:3] == JPEG_MAGIC else None
    if hdr is not None:
        box = crop_box(hdr[0], hdr[1], scale_min, rng)
        return None, 1, Plan(box, bool(rng.random() < hflip))
    im, why = open_image(data, max_aspect=0)  # stage 1 already applied its caps to these samples
    if im is None:
        raise ImageError(why)
    o = orientation(im)
    w, h = im.size
    upright = (h, w) if o >= 5 else (w, h)
    box = crop_box(*upright, scale_min, rng)
    return im, o, Plan(box, bool(rng.random() < hflip))


def draft_scale(box: tuple[int, int, int, int], size: int) -> int:
    """The largest JPEG DCT scale (8, 4, 2, 1) that keeps the crop box >= size on both sides."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    return next(s for s in (8, 4, 2, 1) if s == 1 or min(bw, bh) >= size * s)


def decode_cpu(im, plan: Plan, size: int, draft: bool = True, data: bytes | None = None,
               o: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """An opened image (None: a plain JPEG, `jpeg_header`) + its plan -> uint8 (3, size, size).
    Upright RGB/grayscale JPEGs with no draft to apply go through torchvision's decode_jpeg when
    `data` is given (the same libjpeg-turbo settings as Pillow: equal pixels, tests/test_decode.py;
    no PIL image to copy out); everything else through stage 1's repairs (pipeline/core/images.py)."""
    plain = im is None or (data is not None and gpu_decodable(data, im, o))
    if data is not None and plain and not (draft and draft_scale(plan.box, size) > 1):
        x = _decode_jpeg(data)
        if x is not None:
            return resize_crop(x[None], plan.box, plan.flip, size, out)
    if im is None:  # a plain JPEG to draft, or one decode_jpeg refused: Pillow opens it as stage 1 does
        im, why = open_image(data, max_aspect=0)
        if im is None:
            raise ImageError(why)
    s = draft_scale(plan.box, size) if draft and im.format == "JPEG" else 1
    full, f = im.size, 1.0
    if s > 1:  # draft returns the full picture's box in drafted pixels: f = 1/scale on both axes
        drafted = im.draft(im.mode, (full[0] // s, full[1] // s))  # (not the drafted size's ratio:
        f = drafted[1][2] / full[0] if drafted else 1.0  # it rounds up per axis, and a box scaled
        #                                                  by the wider one's can leave the picture)
    try:
        img, _ = finish_rgb(im)
    except Exception as e:  # noqa: BLE001 -- as load_rgb: any decoder error is bad data
        raise ImageError("corrupt_image") from e
    if f != 1:  # drafted: the box has fractional corners; Pillow's resize takes them as they are
        from PIL import Image  # (rounding them shifts the picture by up to half a drafted pixel)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=tuple(v * f for v in plan.box))
        y = chw(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else img)[0]
        return out.copy_(y) if out is not None else y
    return resize_crop(chw(img), plan.box, plan.flip, size, out)


def _decode_jpeg(data: bytes) -> torch.Tensor | None:
    """torchvision's CPU JPEG decoder, RGB, (3, H, W) uint8 (an HWC buffer); None when it refuses
    the file (Pillow then decides). The op itself: torchvision's wrapper logs API use and warns of
    its deprecation on every call (~30 us an image)."""
    from torchvision.io import ImageReadMode
    try:
        return torch.ops.image.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                           ImageReadMode.RGB.value, False)
    except (RuntimeError, ValueError):
        return None


def chw(img) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) uint8 view of one copy of its pixels (bytearray: a writable
    buffer for torch; np.asarray of a PIL image is read-only)."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, h, w, 3).permute(0, 3, 1, 2)


def batch_buffer(n: int, size: int, shared: bool = False) -> torch.Tensor:
    """uint8 (n, 3, size, size) in channels-last memory (NHWC bytes): the layout torch's uint8
    resize kernels compute in, so `resize_crop(..., out=batch[i])` writes each sample straight into
    its row (no transposing copy: ~0.5 ms of ~1.8 ms per image on the bench's CPU). Consumers see
    an ordinary (B, 3, S, S) tensor; `normalize_uint8` hands the model a contiguous one.
    `shared` (a DataLoader worker's batch): the storage is allocated in shared memory, so handing
    the batch to the training process sends a file descriptor; a private batch is first copied
    into a new shared segment by torch's queue (9.6 MB at B = 64, S = 224, plus that segment's
    page faults: ~5-15 ms a batch on the bench's CPU; make bench's 1-worker row)."""
    shape = (n, size, size, 3)
    if shared and n:  # the allocator torch's own share_memory_() uses, without the copy of the old storage
        x = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
    else:
        x = torch.empty(shape, dtype=torch.uint8)
    return x.permute(0, 3, 1, 2)


def resize_crop(x: torch.Tensor, box, flip: bool, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 3, H, W) uint8 (any strides, any device) -> its box resized to (3, size, size) uint8 with
    the antialiased bicubic filter, mirrored when `flip`. uint8 stays uint8 on CPU (SIMD kernels);
    elsewhere it goes through float32 and is rounded back. `out` (CPU, a (3, size, size) row of
    `batch_buffer`) receives the result in place: the same pixels, one copy fewer."""
    x0, y0, x1, y1 = box
    crop = x[:, :, y0:y1, x0:x1]
    if crop.device.type == "cpu" and out is not None:
        if flip:  # mirror the crop, not the output: fewer pixels, one copy instead of two, and the
            crop = crop.flip(-1)  # symmetric filter gives the same pixels (measured 0; tests/test_decode.py)
        # aten's out= overload writes into the channels-last row as is (F.interpolate has no out=)
        torch.ops.aten._upsample_bicubic2d_aa.out(crop, [size, size], False, None, None, out=out[None])
        return out
    if crop.device.type == "cpu":
        y = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    else:
        y = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    y = (y.flip(-1) if flip else y)[0]
    if out is not None:
        out.copy_(y)
        return out
    return y


def decode_batch_cpu(datas: list[bytes], size: int, scale_min: float, hflip: float,
                     rng: np.random.Generator, draft: bool = True, shared: bool = False,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Image bytes -> uint8 (B, 3, size, size), each sample planned then decoded in order, into
    `out` (a `batch_buffer`-shaped batch, e.g. a pooled one: training/batch_pool.py) or a new
    batch (`shared`: in shared memory)."""
    out = batch_buffer(len(datas), size, shared) if out is None else out
    for i, data in enumerate(datas):
        im, o, plan = open_and_plan(data, size, scale_min, hflip, rng)
        decode_cpu(im, plan, size, draft, data, o, out=out[i])
    return out


@dataclass
class EncodedBatch:
    """What a worker hands the training process under `decode: gpu`: the JPEGs still encoded,
    their plans, and the other samples already decoded on the CPU path."""
    images: torch.Tensor          # uint8 (B, 3, S, S); rows in `jpeg_rows` are filled on the device
    jpegs: list[torch.Tensor]     # 1-D uint8, the file bytes
    jpeg_rows: torch.Tensor       # int64 (n,)
    boxes: torch.Tensor           # int64 (n, 4), upright full-size pixels
    flips: torch.Tensor           # bool (n,)

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> EncodedBatch:
        """The DataLoader's pin thread calls this (train.data.pin_memory on a CUDA machine)."""
        self.images = self.images.pin_memory()
        return self


def gpu_decodable(data: bytes, im, o: int) -> bool:
    """Baseline JPEGs decode_jpeg reads as stage 1 does: YCbCr/grayscale, upright. CMYK (Pillow
    inverts Adobe CMYK) and EXIF-rotated ones take the CPU path. `im` None: `jpeg_header` said so."""
    return im is None or (data[:3] == JPEG_MAGIC and im.format == "JPEG" and im.mode in ("RGB", "L") and o == 1)


def plan_batch(datas: list[bytes], size: int, scale_min: float, hflip: float,
               rng: np.random.Generator, shared: bool = False) -> EncodedBatch:
    """Worker side of `decode: gpu`: headers and plans only for JPEGs, CPU decode for the rest."""
    out = batch_buffer(len(datas), size, shared).zero_()
    rows, jpegs, boxes, flips = [], [], [], []
    for i, data in enumerate(datas):
        im, o, plan = open_and_plan(data, size, scale_min, hflip, rng)
        if gpu_decodable(data, im, o):
            rows.append(i)
            jpegs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            boxes.append(plan.box)
            flips.append(plan.flip)
        else:
            decode_cpu(im, plan, size, draft=True, out=out[i])
    return EncodedBatch(out, jpegs, torch.tensor(rows, dtype=torch.int64),
                        torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), torch.tensor(flips, dtype=torch.bool))


def decode_on_device(enc: EncodedBatch, device: torch.device | str) -> torch.Tensor:
    """Training-process side of `decode: gpu`: one batched decode_jpeg on `device`, then crop,
    resize and flip there. A batch decode_jpeg refuses is retried per image; an image it still
    refuses is decoded on the CPU path (same plan). Returns uint8 (B, 3, S, S) on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if not isinstance(enc, EncodedBatch):  # a stream that decodes itself (training/region_data.py)
        return enc.to(device, non_blocking=True)
    out = enc.images.to(device, non_blocking=True)
    if not enc.jpegs:
        return out
    size = out.shape[-1]
    try:
        decoded = decode_jpeg(enc.jpegs, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        decoded = [_decode_one(j, device) for j in enc.jpegs]
    for k, (row, img) in enumerate(zip(enc.jpeg_rows.tolist(), decoded)):
        box, flip = tuple(enc.boxes[k].tolist()), bool(enc.flips[k])
        if img is None:  # decode_jpeg refused it: the CPU path, same box and flip
            im, why = open_image(enc.jpegs[k].numpy().tobytes(), max_aspect=0)
            if im is None:
                raise ImageError(why)
            out[row] = decode_cpu(im, Plan(box, flip), size).to(device)
        else:
            out[row] = resize_crop(img[None], box, flip, size)
    return out


def _decode_one(data: torch.Tensor, device):
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        return None
