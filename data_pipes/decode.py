"""Decode raw sample bytes into RGB uint8 arrays, fused with the crop geometry.

Samples carry the source file's bytes unchanged (see docs/architecture.md), so whatever ImageNet really holds
arrives here: baseline and progressive JPEGs, grayscale and CMYK JPEGs, PNGs named ``.JPEG``, tiny images,
and the odd broken file. Everything that cannot become an RGB image raises `BadImage` with the reason.

Speed comes from never decoding pixels that the crop throws away: the crop box is chosen on the full-size
geometry read from the header alone, then a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8, via
`PIL.Image.draft`) that still leaves the box at least as large as the output, and only the box is resampled
(`Image.resize(box=...)`, one pass, no intermediate crop). For the usual ImageNet photo (~500x375) and a
random-resized crop this skips most of the IDCT work; for a full-size eval crop at 224 it decodes at 1/2.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BadImage",
    "Box",
    "INTERPOLATIONS",
    "center_crop_box",
    "crop_resize",
    "decode_rgb",
    "dct_reduction",
    "load_region",
    "open_image",
    "random_resized_box",
]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
# Modes PIL resamples natively; anything else (palette, alpha, 16-bit) is made RGB before resampling.
_RESAMPLE_MODES = frozenset({"RGB", "L", "CMYK"})
# Errors PIL raises on corrupt data (OSError covers "image file is truncated" and libjpeg errors).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError)


class BadImage(ValueError):
    """The bytes are empty, truncated, corrupt or not an image; the message says which."""


@dataclass(frozen=True)
class Box:
    """A region of an image in its pixel coordinates (floats, so scaled boxes stay exact)."""

    left: float
    top: float
    width: float
    height: float

    def scaled(self, factor: float) -> Box:
        return Box(self.left * factor, self.top * factor, self.width * factor, self.height * factor)

    def as_pil(self) -> tuple[float, float, float, float]:
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def open_image(data: bytes) -> Image.Image:
    """Parse the header only (no pixels decoded yet); reject bytes that cannot be a complete image."""
    if not data:
        raise BadImage("empty sample (0 bytes)")
    _reject_truncated(data)
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadImage(f"not a decodable image ({len(data)} bytes starting {data[:8]!r})") from e
    except _DECODE_ERRORS as e:
        raise BadImage(f"corrupt image header: {e}") from e


def _reject_truncated(data: bytes) -> None:
    # PIL fills a truncated image with grey instead of failing when some library has set the global
    # ImageFile.LOAD_TRUNCATED_IMAGES, so completeness is checked on the bytes, independent of that flag.
    if data.startswith(_JPEG_MAGIC):
        # Entropy-coded data never contains FFD9/FFDA (0xFF is byte-stuffed), so a complete JPEG has its end
        # marker after its last scan header; the cheap endswith() covers files without trailing bytes.
        if not data.endswith(_JPEG_EOI) and data.rfind(_JPEG_EOI) < data.rfind(_JPEG_SOS):
            raise BadImage(f"truncated JPEG: no end-of-image marker after the last scan ({len(data)} bytes)")
    elif data.startswith(_PNG_MAGIC) and data.rfind(b"IEND") < 0:
        raise BadImage(f"truncated PNG: no IEND chunk ({len(data)} bytes)")


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> Box:
    """Inception crop (torchvision `RandomResizedCrop.get_params`), drawn on the full-size geometry."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return Box(left, top, w, h)
    return _central_box_within_ratio(width, height, ratio)


def _central_box_within_ratio(width: int, height: int, ratio: tuple[float, float]) -> Box:
    # torchvision's fallback: the largest central box whose aspect ratio is inside the allowed range.
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = max(1, int(round(width / min(ratio))))
    elif in_ratio > max(ratio):
        w = max(1, int(round(height * max(ratio))))
    return Box((width - w) // 2, (height - h) // 2, w, h)


def center_crop_box(width: int, height: int, img_size: int, crop_pct: float) -> Box:
    """The source region that timm's eval transform keeps: shorter side resized to int(img_size / crop_pct),
    then a centred img_size square (same integer rounding as torchvision's Resize + CenterCrop)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = int(img_size / crop_pct)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    sx, sy = new_w / width, new_h / height
    left = int(round((new_w - img_size) / 2.0))
    top = int(round((new_h - img_size) / 2.0))
    return Box(left / sx, top / sy, img_size / sx, img_size / sy)


def dct_reduction(box: Box, out_size: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the box at least `out_size` on both sides."""
    for factor in (8, 4, 2):
        if box.width / factor >= out_size and box.height / factor >= out_size:
            return factor
    return 1


def load_region(img: Image.Image, box: Box, out_size: int, *, reduce: bool = True) -> tuple[Image.Image, Box]:
    """Decode the pixels, DCT-reduced when the box allows; returns the image and the box in its coordinates.

    Kept separate from `crop_resize` so tests can see the size that was actually decoded.
    """
    factor = dct_reduction(box, out_size) if reduce and img.format in ("JPEG", "MPO") else 1
    if factor > 1:
        # draft() picks the largest scale s with size // request >= s, so asking for size // factor gives
        # exactly `factor`; the decoded image then covers the original at 1/factor (last block rounded up).
        # It returns None (and decodes at full size) when it cannot scale, e.g. on a second call.
        full_width = img.width
        drafted = img.draft(img.mode, (img.width // factor, img.height // factor))
        factor = 1 if drafted is None else round(full_width / drafted[1][2])
    _load(img)
    return img, _clamp(box.scaled(1.0 / factor), img.width, img.height)


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise BadImage(f"corrupt {img.format or 'image'} data: {e}") from e


def _clamp(box: Box, width: int, height: int) -> Box:
    left, top = min(max(box.left, 0.0), width - 1.0), min(max(box.top, 0.0), height - 1.0)
    right, bottom = min(box.left + box.width, float(width)), min(box.top + box.height, float(height))
    return Box(left, top, max(right - left, 1e-3), max(bottom - top, 1e-3))


def crop_resize(
    img: Image.Image,
    box: Box,
    out_size: int,
    resample: Image.Resampling,
    *,
    reduce: bool = True,
) -> np.ndarray:
    """Decode `box` of a header-only image to uint8 [out_size, out_size, 3] RGB (upscaling small boxes)."""
    img, region = load_region(img, box, out_size, reduce=reduce)
    img = _resamplable(img)
    out = img.resize((out_size, out_size), resample, box=region.as_pil())
    if out.mode != "RGB":
        # Converting after the resize touches out_size^2 pixels instead of the whole decoded image.
        out = out.convert("RGB")
    return np.asarray(out)


def decode_rgb(data: bytes) -> np.ndarray:
    """Full-size decode to uint8 [H, W, 3] RGB, for consumers that need the whole image."""
    img = open_image(data)
    _load(img)
    img = _resamplable(img)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _resamplable(img: Image.Image) -> Image.Image:
    if img.mode in _RESAMPLE_MODES:
        return img
    try:
        if img.mode.startswith("I;16"):
            # PIL's convert clips 16-bit values at 255 instead of scaling them.
            return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
        return img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise BadImage(f"cannot convert mode {img.mode} to RGB: {e}") from e
