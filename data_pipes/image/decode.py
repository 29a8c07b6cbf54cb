"""Decode raw sample bytes into RGB uint8 arrays, fused with the crop geometry.

Samples carry the source file's bytes unchanged (see docs/architecture.md), so whatever ImageNet really holds
arrives here: baseline and progressive JPEGs, grayscale and CMYK JPEGs, PNGs named ``.JPEG``, tiny images,
and the odd broken file. Everything that cannot become an RGB image raises `BadImage` with the reason.

Where the time goes, and what is done about it (per-image costs in bench/README.md):
- JPEGs in YCbCr, RGB or grayscale (all but a few dozen ImageNet files) are decoded by libjpeg-turbo through
  simplejpeg, straight to RGB and ~1.5-3x faster than through PIL; everything else (CMYK, PNG, odd modes) and any
  JPEG that libjpeg-turbo only decodes with warnings goes through PIL, which gives the verdict.
- The crop box is chosen on the geometry read from the header alone, and a JPEG is decoded at the largest DCT
  reduction (1/2, 1/4, 1/8; the other M/8 scalings are slower than a full decode) that still leaves the kept
  region at least as large as the output.
- Resampling matches PIL's filters (the ones timm's transforms use): upscaling bilinear through OpenCV
  (identical filter, at most 1 grey level of rounding apart), everything bilinear/bicubic that shrinks through
  torch's antialiased uint8 kernels (PIL's filter support, bit-for-bit within 1-2 levels), each several times
  faster than PIL's own resize; nearest through OpenCV's exact nearest; lanczos, box and hamming through PIL.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BadImage",
    "Box",
    "Encoded",
    "INTERPOLATIONS",
    "center_crop",
    "crop_resize",
    "dct_reduction",
    "decode_rgb",
    "eval_resize_size",
    "load_region",
    "open_image",
    "random_resized_box",
    "resize",
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
# JPEG colour spaces libjpeg-turbo turns into RGB exactly as PIL does; CMYK/YCCK (Adobe's inverted ink values)
# are left to PIL, which knows Adobe's convention.
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})
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

    def pixels(self, width: int, height: int) -> tuple[slice, slice]:
        """(rows, cols) of the whole pixels nearest to the box, at least one, inside a width x height image."""
        left = min(max(int(round(self.left)), 0), width - 1)
        top = min(max(int(round(self.top)), 0), height - 1)
        right = min(max(int(round(self.left + self.width)), left + 1), width)
        bottom = min(max(int(round(self.top + self.height)), top + 1), height)
        return slice(top, bottom), slice(left, right)


@dataclass(frozen=True, eq=False)
class Encoded:
    """Sample bytes with their geometry read from the header alone (no pixels decoded yet).

    `pil` is the header-parsed PIL image for what PIL decodes; None for a JPEG that libjpeg-turbo decodes.
    """

    data: bytes
    width: int
    height: int
    is_jpeg: bool
    pil: Image.Image | None = None


def open_image(data: bytes) -> Encoded:
    """Parse the header only; reject bytes that cannot be a complete image."""
    if not data:
        raise BadImage("empty sample (0 bytes)")
    _reject_truncated(data)
    if data.startswith(_JPEG_MAGIC):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # PIL has the last word on what this is
        else:
            # Images past PIL's decompression-bomb limit go to PIL too, so that its limit holds for every file.
            if colorspace in _TURBO_COLORSPACES and not _over_pixel_limit(width, height):
                return Encoded(data, width, height, is_jpeg=True)
    img = _open_pil(data)
    return Encoded(data, img.width, img.height, is_jpeg=img.format in ("JPEG", "MPO"), pil=img)


def _open_pil(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadImage(f"not a decodable image ({len(data)} bytes starting {data[:8]!r})") from e
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large to decode safely: {e}") from e
    except _DECODE_ERRORS as e:
        raise BadImage(f"corrupt image header: {e}") from e


def _over_pixel_limit(width: int, height: int) -> bool:
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > limit


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


# --- crop geometry ---------------------------------------------------------------------------------------------


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


def eval_resize_size(width: int, height: int, img_size: int, crop_pct: float) -> tuple[int, int]:
    """(width, height) after timm's eval resize: shorter side to int(img_size / crop_pct), aspect kept with
    torchvision's `Resize(int)` rounding."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = int(img_size / crop_pct)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def dct_reduction(box: Box, out_size: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the box at least `out_size` on both sides."""
    return _reduction(box.width, box.height, out_size, out_size)


def _reduction(width: float, height: float, out_width: int, out_height: int) -> int:
    for factor in (8, 4, 2):
        if width / factor >= out_width and height / factor >= out_height:
            return factor
    return 1


# --- decoding --------------------------------------------------------------------------------------------------


def _decode(src: Encoded, factor: int) -> tuple[np.ndarray, int]:
    """RGB uint8 [H, W, 3] decoded at 1/factor where the format allows; returns the factor actually used."""
    if src.pil is None:
        try:
            # strict: a JPEG that decodes only with warnings (corrupt data libjpeg papers over) goes to PIL.
            arr = simplejpeg.decode_jpeg(src.data, "RGB", min_height=-(-src.height // factor),
                                         min_width=-(-src.width // factor), strict=True)
            return arr, round(src.width / arr.shape[1])
        except ValueError:
            pass
    return _decode_pil(src, factor)


def _decode_pil(src: Encoded, factor: int) -> tuple[np.ndarray, int]:
    img = src.pil if src.pil is not None else _open_pil(src.data)
    if factor > 1 and src.is_jpeg:
        # draft() picks the largest scale s with size // request >= s, so asking for size // factor gives exactly
        # `factor`; it returns None (and decodes at full size) when it cannot scale, e.g. on a second call.
        drafted = img.draft(img.mode, (img.width // factor, img.height // factor))
        factor = 1 if drafted is None else round(src.width / drafted[1][2])
    else:
        factor = 1
    try:
        img.load()
        return np.array(_to_rgb(img)), factor  # a writable copy: PIL's arrays are read-only
    except _DECODE_ERRORS as e:
        raise BadImage(f"corrupt {img.format or 'image'} data: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # PIL's convert clips 16-bit values at 255 instead of scaling them.
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def load_region(src: Encoded, box: Box, out_size: int, *, reduce: bool = True) -> tuple[np.ndarray, Box]:
    """Decode the pixels, DCT-reduced when the box allows; returns the RGB array and the box in its coordinates.

    Kept separate from `crop_resize` so tests can see the size that was actually decoded.
    """
    factor = dct_reduction(box, out_size) if reduce and src.is_jpeg else 1
    arr, factor = _decode(src, factor)
    return arr, box.scaled(1.0 / factor)


def decode_rgb(data: bytes) -> np.ndarray:
    """Full-size decode to uint8 [H, W, 3] RGB, for consumers that need the whole image."""
    return _decode(open_image(data), 1)[0]


# --- resampling ------------------------------------------------------------------------------------------------


# torch's antialiased uint8 resize kernels (what F.interpolate(..., antialias=True) calls), in their out= form.
_AA_RESIZE = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa.out,
              "bicubic": torch.ops.aten._upsample_bicubic2d_aa.out}


def resize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """uint8 [h, w, 3] (any row stride) -> C-contiguous [height, width, 3] with PIL's filter of that name."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(img)
    if interpolation in ("bilinear", "bicubic") and not (interpolation == "bilinear" and h <= height and w <= width):
        # Shrinking (or bicubic): PIL's antialiased filters, torch's uint8 kernels, fed a channels-last view of the
        # HWC array and writing into a channels-last output: an HWC array with no transposing copy on either side
        # (F.interpolate returns NCHW here, whose HWC copy cost as much as the resize itself).
        x = torch.from_numpy(img if img.flags.writeable else img.copy()).permute(2, 0, 1).unsqueeze(0)
        x = x.contiguous(memory_format=torch.channels_last)
        out = torch.empty((1, img.shape[2], height, width), dtype=torch.uint8, memory_format=torch.channels_last)
        _AA_RESIZE[interpolation](x, [height, width], False, None, None, out=out)
        return out[0].permute(1, 2, 0).numpy()
    if interpolation == "bilinear":  # only enlarging: PIL's triangle filter is plain bilinear there
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    if interpolation == "nearest":
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), INTERPOLATIONS[interpolation]))


def crop_resize(src: Encoded, box: Box, out_size: int, interpolation: str, *, reduce: bool = True) -> np.ndarray:
    """Decode `box` of a header-only image to uint8 [out_size, out_size, 3] RGB (upscaling small boxes)."""
    arr, region = load_region(src, box, out_size, reduce=reduce)
    rows, cols = region.pixels(arr.shape[1], arr.shape[0])
    return resize(arr[rows, cols], out_size, out_size, interpolation)


def center_crop(src: Encoded, img_size: int, crop_pct: float, interpolation: str, *, reduce: bool = True) -> np.ndarray:
    """timm's eval transform: resize the shorter side to int(img_size / crop_pct), then the centred img_size
    square (torchvision's rounding), from a DCT-reduced decode where the resized size allows."""
    new_w, new_h = eval_resize_size(src.width, src.height, img_size, crop_pct)
    factor = _reduction(src.width, src.height, new_w, new_h) if reduce and src.is_jpeg else 1
    resized = resize(_decode(src, factor)[0], new_w, new_h, interpolation)
    top, left = int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))
    return np.ascontiguousarray(resized[top: top + img_size, left: left + img_size])
