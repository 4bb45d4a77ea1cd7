"""The one image decoder of every stage: bytes -> upright RGB picture, with the same repairs
everywhere, so the picture stage 3 trains on is the picture stage 1 embedded and stage 2
clustered (and eval, the contact sheets and the demo data see it the same way).

Repairs (counted by stage 1 in ``manifest.json`` ``fixed``): EXIF orientation applied;
16/32-bit grayscale rescaled to 8 bits (not clipped); palette, grayscale, CMYK and other modes
converted to RGB; transparency composited on white (clip art is mostly transparent, and a bare
``convert("RGB")`` shows whatever colour the hidden pixels hold). Images over ``max_pixels``
(``too_large``) or with a longer/shorter side ratio over ``max_aspect`` (``extreme_aspect``) are
refused from the header alone, before any pixel is decoded: a legal 1 x 65,535 PNG of a few
hundred bytes would otherwise need ~13 GB once stage 1 resizes its shortest side to 224 px, and
every later resize (shortest side to S) is bounded by S^2 x max_aspect pixels.

``IMAGE_EXTS`` is the one list of sample extensions read as images, in order of preference
when a sample holds several.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif", "gif")
MAX_PIXELS = 89_478_485  # Pillow's own default limit
MAX_ASPECT = 32.0        # longer / shorter side; 0 = no cap. 32:1 at 224 px: 4.8 MB of pixels (openclipart tops at 25)


class ImageError(ValueError):
    """An image that cannot be decoded; ``reason`` is the skip reason (too_large, ...)."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason


def image_bytes(sample: dict, exts=IMAGE_EXTS) -> bytes | None:
    """The image of a webdataset sample (``{ext: bytes}``): the first extension of ``exts`` it has."""
    return next((sample[e] for e in exts if e in sample), None)


def is_image_name(name: str) -> bool:
    """A tar member / file name whose extension (webdataset's rule: after the first dot of the
    base name) is an image extension."""
    return name.rpartition("/")[2].partition(".")[2].lower() in IMAGE_EXTS


def _allow(max_pixels: int) -> None:
    """Our own size check runs first; this only stops Pillow refusing (or warning) before it."""
    from PIL import Image
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def open_image(data: bytes | str | os.PathLike | None, max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT):
    """Header only: (lazy PIL image, None) or (None, skip reason). Nothing decoded yet."""
    from PIL import Image, UnidentifiedImageError
    if data is not None and not isinstance(data, (bytes, bytearray)):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError:
            return None, "missing_image"
    if data is None:
        return None, "missing_image"
    if len(data) == 0:
        return None, "empty_image"
    _allow(max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, "too_large"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Exception:  # noqa: BLE001 -- a header Pillow cannot parse is bad data
        return None, "corrupt_image"
    w, h = im.size
    if w * h > max_pixels:
        return None, "too_large"
    if min(w, h) < 1 or (max_aspect and max(w, h) > max_aspect * min(w, h)):
        return None, "extreme_aspect"
    return im, None


def orientation(im) -> int:
    """EXIF orientation (1 = upright; 5-8 swap width and height). JPEG: from the header."""
    o = im.getexif().get(0x0112, 1)
    return o if o in range(1, 9) else 1


def finish_rgb(im):
    """Decode a (possibly drafted) opened image -> (upright RGB image, [repairs]). Raises."""
    im.load()
    fixes = []
    if orientation(im) in range(2, 9):  # EXIF orientation: rotate/flip upright
        from PIL import ImageOps
        im = ImageOps.exif_transpose(im)
        fixes.append("exif_rotated")
    im, mode_fixes = to_rgb(im)
    return im, fixes + mode_fixes


def load_rgb(data: bytes | str | os.PathLike | None, max_pixels: int = MAX_PIXELS, draft: int = 0,
             max_aspect: float = MAX_ASPECT):
    """Image bytes (or a file path) -> (RGB PIL image, [repairs]) or (None, skip reason).
    ``draft``: JPEGs are decoded at the smallest DCT scale still >= draft px (decode cost drops
    ~scale^2; used where the picture is resized to about that size anyway). Never raises."""
    from PIL import Image, UnidentifiedImageError
    im, why = open_image(data, max_pixels, max_aspect)
    if im is None:
        return None, why
    try:
        if draft and im.format == "JPEG":
            im.draft(im.mode, (draft, draft))
        return finish_rgb(im)
    except Image.DecompressionBombError:
        return None, "too_large"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Exception:  # noqa: BLE001 -- any decoder error is bad data: truncated, corrupt, ...
        return None, "corrupt_image"


def decode_rgb(data: bytes | str | os.PathLike | None, max_pixels: int = MAX_PIXELS, draft: int = 0,
               where: str = "", max_aspect: float = MAX_ASPECT):
    """``load_rgb`` for callers that treat a bad image as an error: the RGB image, or ImageError."""
    im, why = load_rgb(data, max_pixels, draft, max_aspect)
    if im is None:
        raise ImageError(why, where or (str(data) if isinstance(data, (str, os.PathLike)) else ""))
    return im


def to_rgb(im):
    """Any Pillow mode -> (RGB image, [repairs]); transparent pixels go on white."""
    from PIL import Image
    mode, fixes = im.mode, []
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16/32-bit: rescale, don't clip
        a = np.asarray(im, dtype=np.float32)
        if a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB"), ["high_bit_depth"]
    if mode in ("P", "PA"):
        fixes.append("palette")
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        fixes.append("alpha")
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB"), fixes
    if mode == "RGB":
        return im, fixes
    fixes.append({"L": "grayscale", "1": "grayscale", "CMYK": "cmyk"}.get(mode, f"mode_{mode}"))
    return im.convert("RGB"), fixes
