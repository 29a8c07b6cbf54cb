"""data_pipes.image.decode: what real ImageNet bytes look like, and the DCT-reduced fused crop."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_pipes.image.decode import (
    INTERPOLATIONS,
    BadImage,
    Box,
    crop_resize,
    dct_reduction,
    decode_rgb,
    eval_resize_size,
    load_region,
    open_image,
    random_resized_box,
    resize,
)

BILINEAR = "bilinear"


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus a few sharp edges: enough structure for resampling differences to show."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.array(coarse)
    arr[height // 3: height // 2, width // 4: width // 2] = (250, 20, 20)
    arr[:, width * 3 // 4: width * 3 // 4 + 9] = 0
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return _encode(_photo_like(2000, 1500), quality=92)


def _real_jpeg(root: Path) -> bytes:
    return sorted((root / "train").glob("*/*.JPEG"))[0].read_bytes()


def test_large_box_is_decoded_at_reduced_dct_scale(large_jpeg):
    # Full image (shorter side 1500) into 224: 1/4 keeps 375 >= 224, 1/8 would give 187 < 224.
    img, region = load_region(open_image(large_jpeg), Box(0, 0, 2000, 1500), 224)
    assert img.shape == (375, 500, 3)
    assert region == Box(0.0, 0.0, 500.0, 375.0)
    img, region = load_region(open_image(large_jpeg), Box(400, 300, 600, 500), 224)
    assert img.shape == (750, 1000, 3)
    assert region == Box(200.0, 150.0, 300.0, 250.0)


def test_box_smaller_than_twice_the_output_is_decoded_at_full_size(large_jpeg):
    img, _ = load_region(open_image(large_jpeg), Box(100, 100, 300, 447), 224)
    assert img.shape == (1500, 2000, 3)
    assert dct_reduction(Box(0, 0, 447, 2000), 224) == 1


def test_reduction_can_be_switched_off(large_jpeg):
    img, _ = load_region(open_image(large_jpeg), Box(0, 0, 2000, 1500), 224, reduce=False)
    assert img.shape == (1500, 2000, 3)


@pytest.mark.parametrize("box", [Box(0, 0, 2000, 1500), Box(130, 240, 1100, 900), Box(1500, 1000, 480, 500)])
def test_dct_reduced_crop_nearly_equals_full_decode(large_jpeg, box):
    reduced = crop_resize(open_image(large_jpeg), box, 224, BILINEAR).astype(int)
    full = crop_resize(open_image(large_jpeg), box, 224, BILINEAR, reduce=False).astype(int)
    assert reduced.shape == full.shape == (224, 224, 3)
    assert np.abs(reduced - full).mean() < 1.5
    assert np.percentile(np.abs(reduced - full), 99) <= 10  # sharp edges on the box border blur slightly


def test_grayscale_jpeg_decodes_to_three_equal_channels():
    data = _encode(_photo_like(300, 200).convert("L"))
    out = crop_resize(open_image(data), Box(0, 0, 300, 200), 64, BILINEAR)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg_decodes_to_rgb_like_pil():
    cmyk = _photo_like(640, 480).convert("CMYK")
    data = _encode(cmyk, quality=95)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
    decoded = decode_rgb(data)
    assert decoded.shape == (480, 640, 3)
    assert np.abs(decoded.astype(int) - expected).mean() < 1.0
    # The reduced-and-resized path converts after resampling; colours must still agree.
    small = crop_resize(open_image(data), Box(0, 0, 640, 480), 120, BILINEAR)
    assert small.shape == (120, 120, 3)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((120, 120), Image.BILINEAR), dtype=int)
    assert np.abs(small.astype(int) - reference).mean() < 3.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_png_bytes_decode_to_rgb(mode):
    base = _photo_like(96, 64)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        img = base.convert("P")
        img.info["transparency"] = 0
    else:
        img = base.convert(mode)
    data = _encode(img, "PNG")
    out = crop_resize(open_image(data), Box(0, 0, 96, 64), 32, BILINEAR)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode == "I;16":
        # 16-bit samples are scaled to 8 bits, not clipped to white.
        expected = np.asarray(base.convert("L").resize((32, 32), Image.BILINEAR), dtype=int)
        assert np.abs(out[..., 0].astype(int) - expected).mean() < 2.0


def test_tiny_image_is_upscaled_to_the_output_size():
    data = _encode(Image.new("RGB", (8, 8), (10, 200, 30)))
    out = crop_resize(open_image(data), Box(0, 0, 8, 8), 224, BILINEAR)
    assert out.shape == (224, 224, 3)
    assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 3


def test_empty_bytes_raise_bad_image():
    with pytest.raises(BadImage, match="empty"):
        open_image(b"")


def test_text_bytes_raise_bad_image():
    with pytest.raises(BadImage, match="not a decodable image"):
        open_image(b"<html><body>404 Not Found</body></html>\n" * 20)


@pytest.mark.imagenette
@pytest.mark.parametrize("flag", [False, True], ids=["default", "LOAD_TRUNCATED_IMAGES"])
def test_half_a_real_jpeg_raises_bad_image_even_with_the_pil_flag(imagenette_root, monkeypatch, flag):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
    data = _real_jpeg(imagenette_root)
    with pytest.raises(BadImage, match="truncated"):
        crop_resize(open_image(data[: len(data) // 2]), Box(0, 0, 10, 10), 8, BILINEAR)


def test_truncated_png_raises_bad_image():
    data = _encode(_photo_like(96, 64), "PNG")
    with pytest.raises(BadImage, match="truncated PNG"):
        open_image(data[: len(data) * 2 // 3])


def test_corrupt_jpeg_body_raises_bad_image():
    data = bytearray(_encode(_photo_like(256, 256), quality=90))
    # Keep the header and the end marker but destroy the scan: libjpeg rejects it.
    sos = bytes(data).find(b"\xff\xda")
    data[sos + 2: sos + 40] = b"\xff\xc0" * 19
    with pytest.raises(BadImage):
        crop_resize(open_image(bytes(data)), Box(0, 0, 256, 256), 64, BILINEAR)


def test_jpeg_with_trailing_bytes_after_the_end_marker_still_decodes():
    data = _encode(_photo_like(64, 48)) + b"\x00garbage appended by some camera"
    assert decode_rgb(data).shape == (48, 64, 3)


def test_random_resized_box_stays_inside_the_image_within_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        box = random_resized_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert box.left >= 0 and box.left + box.width <= 500
        assert box.top >= 0 and box.top + box.height <= 375
        area = box.width * box.height / (500 * 375)
        assert 0.07 < area <= 1.0
        assert 0.7 < box.width / box.height < 1.4


def test_random_resized_box_falls_back_to_the_central_box_with_allowed_ratio():
    # A 4:1 strip cannot hold a full-area square, so every try fails and the central square is used.
    box = random_resized_box(400, 100, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(0))
    assert box == Box(150, 0, 100, 100)


def test_center_crop_box_rejects_crop_pct_outside_unit_interval():
    with pytest.raises(ValueError, match="crop_pct"):
        eval_resize_size(500, 375, 224, 1.2)


def test_libjpeg_turbo_and_pil_decode_the_same_pixels(large_jpeg):
    src = open_image(large_jpeg)
    assert src.pil is None  # the fast path took it
    fast = decode_rgb(large_jpeg).astype(int)
    pil = np.asarray(Image.open(io.BytesIO(large_jpeg)).convert("RGB"), dtype=int)
    assert fast.shape == pil.shape
    assert np.abs(fast - pil).max() <= 1


def test_cmyk_and_png_are_left_to_pil():
    cmyk = _encode(_photo_like(64, 48).convert("CMYK"))
    png = _encode(_photo_like(64, 48), "PNG")
    assert open_image(cmyk).pil is not None and open_image(cmyk).is_jpeg
    assert open_image(png).pil is not None and not open_image(png).is_jpeg


def test_jpeg_that_libjpeg_decodes_only_with_warnings_falls_back_to_pil():
    data = _encode(_photo_like(64, 48))
    dqt = data.find(b"\xff\xdb")
    # Stray bytes before a marker: libjpeg warns "extraneous bytes before marker" and decodes; PIL accepts it.
    odd = data[:dqt] + b"\x00\x00\x00" + data[dqt:]
    expected = np.asarray(Image.open(io.BytesIO(odd)).convert("RGB"))
    assert np.array_equal(decode_rgb(odd), expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
@pytest.mark.parametrize("size", [(90, 70), (224, 224), (400, 333)], ids=["shrink", "same", "enlarge"])
def test_resize_matches_pil_filters(interpolation, size):
    img = np.asarray(_photo_like(251, 199))
    crop = img[13:213, 7:230]  # a strided view, as crops are
    out = resize(crop, *size, interpolation)
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, INTERPOLATIONS[interpolation]))
    assert out.shape == ref.shape and out.flags.c_contiguous and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref)
    assert diff.mean() < 0.5 and diff.max() <= 2


def test_resize_rejects_an_unknown_filter():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resize(np.zeros((8, 8, 3), np.uint8), 4, 4, "area")


def test_an_image_past_pils_pixel_limit_is_refused_whatever_the_decoder(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses past twice the limit, warns past it
    data = _encode(_photo_like(64, 48))  # 3072 pixels
    with pytest.raises(BadImage, match="too large to decode safely"):
        open_image(data)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_shrinking_resize_is_torchs_antialiased_interpolate_pixel_for_pixel_and_returns_hwc(interpolation):
    import torch

    img = np.random.default_rng(1).integers(0, 256, (203, 311, 3), dtype=np.uint8)
    read_only = img.copy()
    read_only.flags.writeable = False  # e.g. a decoded buffer
    for src in (img, img[10:190, 7:300], read_only):  # contiguous, strided, read-only
        out = resize(src, 120, 90, interpolation)
        x = torch.from_numpy(np.ascontiguousarray(src)).permute(2, 0, 1).unsqueeze(0)
        ref = torch.nn.functional.interpolate(x, size=(90, 120), mode=interpolation, antialias=True)
        assert out.shape == (90, 120, 3) and out.flags.c_contiguous
        assert np.array_equal(out, ref[0].permute(1, 2, 0).numpy())
