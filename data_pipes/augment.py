"""Train and eval transforms: `bytes -> np.uint8 [S, S, 3]` RGB, picklable, one call per sample.

Train = fused decode + Inception crop (data_pipes.decode: the random-resized-crop box is drawn on the header
geometry, the JPEG decoded DCT-reduced when the box is large, and only the box resampled to S x S), then an
albumentations pipeline on the S x S image: horizontal flip -> AutoAugment | RandAugment -> colour jitter ->
random erasing (timm's order).
Eval = decode (DCT-reduced when possible) + resize shorter side to int(S / crop_pct) + centre crop S (timm's eval
transform).

albumentations 2.0.x is its last MIT release (its successor is AGPL), so this is the only module that imports it;
swapping the engine means rewriting this file only. albumentations has no AutoAugment/RandAugment, and its stock
transforms draw from ranges, while these policies need a fixed magnitude (plus optional Gaussian noise), a random
sign, TF/PIL geometry (shear about the top-left corner, fill colours) and a per-layer apply probability. So each
policy op is a small `A.ImageOnlyTransform` (`PolicyOp`) whose randomness comes from albumentations' seeded
generators and whose pixels are albumentations kernels (`warp_affine`, `equalize`, `solarize`, `posterize`,
`auto_contrast`, `invert`, `adjust_*_torchvision`, `convolve`); policies are composed with `A.OneOf` /
`A.Sequential`. Flip and colour jitter are stock `A.HorizontalFlip` / `A.ColorJitter`.

Op arguments. m = magnitude; f = m / 10 on the TF/timm 0-10 level scale, f = i / 9 for torchvision's bin index i;
s = random sign; "size" = image width for X ops, height for Y ops. Columns: `tf` (TFMG RandAugment, AA v0) |
`timm` | `timm` + increasing (timm 'inc1') | torchvision AA (AutoAugmentPolicy.IMAGENET):

    Rotate         30 f s degrees          | same                   | same                  | same
    ShearX/Y       0.3 f s                 | same                   | same                  | same
    TranslateX/Y   translate_const f s px  | 0.45 f s size          | same as timm          | int(150/331 size f) s
    Color, Contrast,
    Brightness,    0.1 + 1.8 f (no sign)   | same                   | max(0.1, 1 + 0.9 f s) | 1 + 0.9 f s
    Sharpness
    Posterize      keep int(4 f) bits      | same                   | keep 4 - int(4 f)     | keep 8 - round(4 f)
    Solarize       invert >= int(256 f)    | >= min(256, int(256f)) | >= 256 - that         | >= 255 (1 - f)
    SolarizeAdd    +int(110 f) below 128   | +min(128, int(110 f))  | same as timm          | -
    Cutout         2 int(cutout_const f) square, fill 128 | -       | -                     | -
    AutoContrast, Equalize, Invert: no argument in every column.
    Fill / interpolation of geometric ops: tf 128 grey / nearest (TF image_ops); timm ImageNet mean
    (124, 116, 104) / the train interpolation; torchvision 0 / the train interpolation.

Magnitudes above 10 (the MNv4 configs use 15) extend these linear maps exactly as TF does: at m15 rotate 45,
shear 0.45, enhance factor 2.8, posterize keeps 6 bits, solarize threshold 384 (a no-op), SolarizeAdd +165.
The `tf` flavour also has TF's extra identity choice per layer (`tf.switch_case` default branch); `prob` is TF's
`prob_to_apply` / timm's `p`, applied per layer. magnitude_std > 0 draws N(m, std) per op call (timm's `mstd`;
>= 100 means uniform in [0, m]), clipped to [0, magnitude_max] (default: 10 for timm, max(10, m) for tf).
Known deviations: TF's Contrast blends with (pixel count / 256) instead of the mean grey level (a TF bug that
turns into "blend with white" at 256 px and above); here it blends with the mean grey level, as PIL does.
albumentations' PIL-mode equalize uses an inclusive histogram cumsum (PIL's is exclusive), a one-bin shift.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from data_pipes.decode import INTERPOLATIONS, center_crop, crop_resize, eval_resize_size, open_image, random_resized_box

# albumentations queries PyPI on every import (2 s timeout, in every spawned worker too) and advises upgrading,
# which here would mean its AGPL successor; pinned at 2.0.x, the check is only a cost.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402
from albumentations.augmentations.pixel import functional as fpixel  # noqa: E402

__all__ = [
    "AUTOAUGMENT_POLICIES",
    "ColorJitterConfig",
    "EvalTransform",
    "PolicyOp",
    "RandAugmentConfig",
    "RandomErasing",
    "RandomErasingConfig",
    "TrainTransform",
    "build_eval_transform",
    "build_train_transform",
    "randaugment_ops",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# TF Model Garden RandAugment op list (official/vision/ops/augment.py), in its order.
TF_RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)
# timm's _RAND_TRANSFORMS (Cutout is done by random erasing there).
TIMM_RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)

# AutoAugment ImageNet policy (AutoAugment paper; torchvision AutoAugmentPolicy.IMAGENET): (op, prob, bin 0-9).
_POLICY_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
# TF "v0" policy (TPU EfficientNet / TF Model Garden AutoAugment default, used by TFMG MobileNetV3-Large):
# (op, prob, level 0-10).
_POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)), (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)), (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
AUTOAUGMENT_POLICIES = ("imagenet", "v0")

_CV2_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
               "lanczos": cv2.INTER_LANCZOS4}
_RANDOM_INTERP = ("bilinear", "bicubic")  # timm's 'random' train interpolation
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL ImageFilter.SMOOTH


# ---------------------------------------------------------------------------------------------------------------
# Config schemas (plain dataclasses so Hydra's DictConfig never reaches the transforms)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentConfig:
    """`randaugment:` in conf/aug/*.yaml. Defaults are TF Model Garden's RandAugment config."""

    num_ops: int = 2
    magnitude: float = 10.0
    prob: float = 1.0  # per layer; TF prob_to_apply (None = 1.0), timm 'p' (its default is 0.5)
    magnitude_std: float = 0.0
    magnitude_max: float | None = None  # clip bound; None = 10 for timm, max(10, magnitude) for tf
    exclude: tuple[str, ...] = ()
    flavor: str = "tf"  # tf | timm: op list and argument ranges (see the module docstring)
    increasing: bool = False  # timm 'inc1': severity grows with magnitude for every op
    translate_const: float = 10.0  # tf: translation in pixels at magnitude 10
    cutout_const: float = 40.0  # tf: Cutout half-size in pixels at magnitude 10

    def __post_init__(self) -> None:
        if self.flavor not in ("tf", "timm"):
            raise ValueError(f"randaugment.flavor must be 'tf' or 'timm', got {self.flavor!r}")
        if self.increasing and self.flavor != "timm":
            raise ValueError("randaugment.increasing is a timm option; set flavor: timm")
        ops = TF_RANDAUGMENT_OPS if self.flavor == "tf" else TIMM_RANDAUGMENT_OPS
        unknown = sorted(set(self.exclude) - set(ops))
        if unknown:
            raise ValueError(f"randaugment.exclude has unknown ops {unknown}; {self.flavor} ops are {list(ops)}")
        if set(ops) <= set(self.exclude):
            raise ValueError("randaugment.exclude removes every op; drop randaugment instead")
        if not 0.0 <= self.prob <= 1.0 or self.num_ops < 0 or self.magnitude < 0:
            raise ValueError(f"randaugment needs 0 <= prob <= 1, num_ops >= 0, magnitude >= 0: {self}")


@dataclass(frozen=True)
class ColorJitterConfig:
    """`color_jitter:` (torchvision/timm semantics: factors uniform in [1 - x, 1 + x], hue in [-h, h])."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    prob: float = 1.0


@dataclass(frozen=True)
class RandomErasingConfig:
    """`random_erasing:` timm `RandomErasing` (`--reprob/--remode/--recount`) on the uint8 image.

    mode: pixel = per-pixel N(0, 1) noise in normalised space, rand = one N(0, 1) colour per patch,
    const = 0 in normalised space (the mean colour; torchvision's default value=0). Normalisation happens on the
    device, so the noise is drawn as mean + std * N(0, 1) in pixel units and clipped to [0, 255] (timm's noise is
    unclipped; about 3% of the noise values are clipped).
    """

    prob: float = 0.25
    area: tuple[float, float] = (0.02, 1 / 3)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    mode: str = "pixel"
    max_count: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random_erasing.mode must be pixel, rand or const, got {self.mode!r}")


def _parse(cls: type, value: Mapping[str, Any] | None, key: str) -> Any:
    """A yaml mapping (dict or DictConfig) -> frozen dataclass with plain Python values."""
    if value is None:
        return None
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - valid)
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; valid keys are {sorted(valid)}")
    return cls(**{k: _plain(v) for k, v in value.items()})


def _plain(value: Any) -> Any:
    # ListConfig and lists become tuples so the dataclasses stay hashable and picklable without omegaconf.
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Policy ops
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpStyle:
    """How a policy maps magnitudes to op arguments, and the fill/interpolation of its geometric ops."""

    name: str  # tf | timm | timm_inc | torchvision
    full_scale: float  # magnitude at which each op reaches its nominal maximum
    fill: tuple[int, int, int]
    interpolation: str  # a _CV2_INTERP key or 'random'
    translate_const: float = 0.0
    cutout_const: float = 0.0


def _rotate_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> float:
    return 30.0 * f * sign


def _shear_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> float:
    return 0.3 * f * sign


def _translate_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> float:
    size = hw[1] if axis == 0 else hw[0]
    if style.name == "tf":
        return style.translate_const * f * sign
    if style.name == "torchvision":
        return int(150.0 / 331.0 * size * f) * sign
    return 0.45 * f * size * sign


def _enhance_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> float:
    if style.name in ("tf", "timm"):
        return 0.1 + 1.8 * f  # legacy TF mapping: below 1 under m5, above 1 over it; never signed
    factor = 1.0 + 0.9 * f * sign
    return max(0.1, factor) if style.name == "timm_inc" else factor


def _posterize_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> int:
    if style.name == "torchvision":
        bits = 8 - round(4 * f)
    else:
        bits = int(4 * f)
        bits = 4 - bits if style.name == "timm_inc" else bits
    return min(max(bits, 0), 8)


def _solarize_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> float:
    if style.name == "torchvision":
        return 255.0 * (1.0 - f)
    threshold = int(256 * f)
    if style.name == "tf":
        return threshold
    threshold = min(256, threshold)
    return 256 - threshold if style.name == "timm_inc" else threshold


def _solarize_add_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> int:
    addition = int(110 * f)
    return addition if style.name == "tf" else min(128, addition)


def _cutout_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> int:
    return int(style.cutout_const * f)


def _no_arg(f: float, sign: float, style: _OpStyle, hw: tuple[int, int], axis: int) -> None:
    return None


_ARGUMENTS = {
    "AutoContrast": _no_arg, "Equalize": _no_arg, "Invert": _no_arg,
    "Rotate": _rotate_arg, "ShearX": _shear_arg, "ShearY": _shear_arg,
    "TranslateX": _translate_arg, "TranslateY": _translate_arg,
    "Color": _enhance_arg, "Contrast": _enhance_arg, "Brightness": _enhance_arg, "Sharpness": _enhance_arg,
    "Posterize": _posterize_arg, "Solarize": _solarize_arg, "SolarizeAdd": _solarize_add_arg, "Cutout": _cutout_arg,
}


def _warp(img: np.ndarray, inverse: np.ndarray, fill: tuple[int, int, int], interp: int) -> np.ndarray:
    # The matrices are PIL/TF-style output -> input maps, hence WARP_INVERSE_MAP.
    return fgeometric.warp_affine(img, inverse, interp | cv2.WARP_INVERSE_MAP, fill, cv2.BORDER_CONSTANT,
                                  img.shape[:2])


def _rotate(img: np.ndarray, degrees: float, fill: tuple[int, int, int], interp: int) -> np.ndarray:
    h, w = img.shape[:2]
    inverse = np.eye(3)
    inverse[:2] = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), -degrees, 1.0)
    return _warp(img, inverse, fill, interp)


def _affine_kernel(row: int, col: int):
    """Shear/translate as a one-entry change of the identity inverse map (PIL's AFFINE data layout)."""

    def kernel(img: np.ndarray, value: float, fill: tuple[int, int, int], interp: int) -> np.ndarray:
        inverse = np.eye(3)
        inverse[row, col] = value
        if col != 2:
            # PIL samples at pixel centres (x + 0.5); OpenCV at integer coordinates. Matters only for shear.
            inverse[row, 2] = 0.5 * value
        return _warp(img, inverse, fill, interp)

    return kernel


def _sharpness(img: np.ndarray, factor: float, fill: Any, interp: int) -> np.ndarray:
    smooth = fpixel.convolve(img, _SMOOTH)
    # PIL (and TF) keep the border pixels unfiltered.
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return cv2.addWeighted(img, factor, smooth, 1.0 - factor, 0.0)


def _posterize(img: np.ndarray, bits: int, fill: Any, interp: int) -> np.ndarray:
    # Edge cases handled here: albumentations' mask arithmetic overflows (with a warning) at 0 bits.
    if bits >= 8:
        return img
    return np.zeros_like(img) if bits <= 0 else fpixel.posterize(img, bits)


def _solarize_add(img: np.ndarray, addition: int, fill: Any, interp: int) -> np.ndarray:
    lut = np.arange(256)
    lut = np.where(lut < 128, np.minimum(lut + addition, 255), lut).astype(np.uint8)
    return cv2.LUT(img, lut)


def _cutout(img: np.ndarray, half: int, fill: tuple[int, int, int], center: tuple[float, float]) -> np.ndarray:
    h, w = img.shape[:2]
    cy, cx = int(center[0] * h), int(center[1] * w)
    out = img.copy()
    out[max(0, cy - half): cy + half, max(0, cx - half): cx + half] = fill
    return out


_KERNELS = {
    "AutoContrast": lambda img, a, fill, interp: fpixel.auto_contrast(img, 0, None, "pil"),
    "Equalize": lambda img, a, fill, interp: fpixel.equalize(img, mode="pil"),
    "Invert": lambda img, a, fill, interp: fpixel.invert(img),
    "Rotate": _rotate,
    "ShearX": _affine_kernel(0, 1), "ShearY": _affine_kernel(1, 0),
    "TranslateX": _affine_kernel(0, 2), "TranslateY": _affine_kernel(1, 2),
    "Color": lambda img, a, fill, interp: fpixel.adjust_saturation_torchvision(img, a),
    "Contrast": lambda img, a, fill, interp: fpixel.adjust_contrast_torchvision(img, a),
    "Brightness": lambda img, a, fill, interp: fpixel.adjust_brightness_torchvision(img, a),
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": lambda img, a, fill, interp: fpixel.solarize(img, a / 255.0),
    "SolarizeAdd": _solarize_add,
}


class PolicyOp(A.ImageOnlyTransform):
    """One AutoAugment/RandAugment op at a magnitude; argument, sign and interpolation are drawn per call."""

    def __init__(
        self,
        op: str,
        magnitude: float | None,
        style: _OpStyle,
        magnitude_std: float = 0.0,
        magnitude_max: float = 10.0,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if op not in _ARGUMENTS:
            raise ValueError(f"unknown policy op {op!r}; known: {sorted(_ARGUMENTS)}")
        self.op = op
        self.magnitude = magnitude
        self.style = style
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max

    def get_params(self) -> dict[str, Any]:
        # Names avoid 'interpolation'/'fill': albumentations overwrites params that share a transform attribute's name.
        return {
            "level": self._sample_magnitude() / self.style.full_scale,
            "sign": 1.0 if self.py_random.random() < 0.5 else -1.0,
            "resample": self._sample_interpolation(),
            "center": (self.py_random.random(), self.py_random.random()),
        }

    def _sample_magnitude(self) -> float:
        if self.magnitude is None:
            return 0.0
        m = float(self.magnitude)
        if self.magnitude_std >= 100:  # timm: mstd > 100 means uniform in [0, m]
            m = self.py_random.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = self.py_random.gauss(m, self.magnitude_std)
        return min(max(m, 0.0), self.magnitude_max)

    def _sample_interpolation(self) -> int:
        name = self.style.interpolation
        if name == "random":
            name = _RANDOM_INTERP[self.py_random.random() < 0.5]
        return _CV2_INTERP.get(name, cv2.INTER_LINEAR)

    def apply(self, img: np.ndarray, level: float, sign: float, resample: int, center: tuple[float, float],
              **params: Any) -> np.ndarray:
        axis = 1 if self.op.endswith("Y") else 0
        arg = _ARGUMENTS[self.op](level, sign, self.style, img.shape[:2], axis)
        if self.op == "Cutout":
            return _cutout(img, arg, self.style.fill, center)
        return _KERNELS[self.op](img, arg, self.style.fill, resample)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("op", "magnitude", "magnitude_std", "magnitude_max")


class RandomErasing(A.ImageOnlyTransform):
    """timm's RandomErasing (same box sampling: 10 tries, log-uniform aspect) on uint8 pixels."""

    def __init__(self, cfg: RandomErasingConfig):
        super().__init__(p=cfg.prob)
        self.cfg = cfg
        self._mean = np.array(cfg.mean, dtype=np.float32) * 255.0
        self._std = np.array(cfg.std, dtype=np.float32) * 255.0

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        count = 1 if self.cfg.max_count <= 1 else self.py_random.randint(1, self.cfg.max_count)
        patches = []
        for _ in range(count):
            box = self._sample_box(h, w, count)
            if box is not None:
                patches.append((box, self._fill(box[2], box[3])))
        return {"patches": patches}

    def _sample_box(self, h: int, w: int, count: int) -> tuple[int, int, int, int] | None:
        log_aspect = (math.log(self.cfg.aspect[0]), math.log(self.cfg.aspect[1]))
        for _ in range(10):
            target_area = self.py_random.uniform(*self.cfg.area) * h * w / count
            aspect = math.exp(self.py_random.uniform(*log_aspect))
            ph, pw = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if pw < w and ph < h:
                return self.py_random.randint(0, h - ph), self.py_random.randint(0, w - pw), ph, pw
        return None

    def _fill(self, ph: int, pw: int) -> np.ndarray:
        if self.cfg.mode == "const":
            return np.round(self._mean).astype(np.uint8)
        shape = (ph, pw, 3) if self.cfg.mode == "pixel" else (1, 1, 3)
        noise = self.random_generator.standard_normal(shape, dtype=np.float32) * self._std + self._mean
        return np.clip(np.round(noise), 0, 255).astype(np.uint8)

    def apply(self, img: np.ndarray, patches: list, **params: Any) -> np.ndarray:
        if not patches:
            return img
        out = img.copy()
        for (top, left, ph, pw), fill in patches:
            out[top: top + ph, left: left + pw] = fill
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("cfg",)


def randaugment_ops(cfg: RandAugmentConfig) -> tuple[str, ...]:
    """The ops one RandAugment layer chooses from (identity aside), after `exclude`."""
    ops = TF_RANDAUGMENT_OPS if cfg.flavor == "tf" else TIMM_RANDAUGMENT_OPS
    return tuple(op for op in ops if op not in cfg.exclude)


def _randaugment(cfg: RandAugmentConfig, interpolation: str) -> A.BaseCompose:
    if cfg.flavor == "tf":
        style = _OpStyle("tf", 10.0, (128, 128, 128), "nearest", cfg.translate_const, cfg.cutout_const)
        upper = cfg.magnitude_max if cfg.magnitude_max is not None else max(10.0, cfg.magnitude)
    else:
        style = _OpStyle("timm_inc" if cfg.increasing else "timm", 10.0, _mean_fill(), interpolation)
        upper = cfg.magnitude_max if cfg.magnitude_max is not None else 10.0

    def layer() -> A.OneOf:
        ops = [PolicyOp(op, cfg.magnitude, style, cfg.magnitude_std, upper) for op in randaugment_ops(cfg)]
        if cfg.flavor == "tf":
            ops.append(A.NoOp(p=1.0))  # TF's switch_case default branch: one extra 'identity' choice
        return A.OneOf(ops, p=cfg.prob)

    return A.Sequential([layer() for _ in range(cfg.num_ops)], p=1.0)


def _autoaugment(policy: str, interpolation: str) -> A.BaseCompose:
    if policy == "imagenet":
        style, table = _OpStyle("torchvision", 9.0, (0, 0, 0), interpolation), _POLICY_IMAGENET
    elif policy == "v0":
        # TF AutoAugment config defaults: translate_const 250, cutout_const 100.
        style, table = _OpStyle("tf", 10.0, (128, 128, 128), "nearest", 250.0, 100.0), _POLICY_V0
    else:
        raise ValueError(f"autoaugment must be one of {AUTOAUGMENT_POLICIES} or null, got {policy!r}")
    # The upper bound never clips a policy's fixed magnitudes.
    sub_policies = [
        A.Sequential([PolicyOp(op, m, style, 0.0, 10.0, p=prob) for op, prob, m in sub], p=1.0) for sub in table
    ]
    return A.OneOf(sub_policies, p=1.0)


def _mean_fill() -> tuple[int, int, int]:
    return tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN)  # timm's img_mean hparam


def _color_jitter(cfg: ColorJitterConfig) -> A.ColorJitter:
    return A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                         p=cfg.prob)


def _pipeline(
    interpolation: str,
    hflip: float,
    randaugment: RandAugmentConfig | None,
    autoaugment: str | None,
    color_jitter: ColorJitterConfig | None,
    random_erasing: RandomErasingConfig | None,
) -> A.Compose | None:
    if randaugment is not None and autoaugment is not None:
        raise ValueError("choose randaugment or autoaugment, not both")
    steps: list[Any] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if autoaugment is not None:
        steps.append(_autoaugment(autoaugment, interpolation))
    if randaugment is not None and randaugment.num_ops > 0:
        steps.append(_randaugment(randaugment, interpolation))
    if color_jitter is not None:
        steps.append(_color_jitter(color_jitter))
    if random_erasing is not None and random_erasing.prob > 0:
        steps.append(RandomErasing(random_erasing))
    return A.Compose(steps, p=1.0, is_check_shapes=False) if steps else None


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _writable(arr: np.ndarray) -> np.ndarray:
    # PIL hands out read-only arrays; torch.as_tensor in the collate warns on them and they cannot be edited in place.
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")


def _resample(name: str) -> Image.Resampling | None:
    if name == "random":
        return None
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)} or 'random', got {name!r}")
    return INTERPOLATIONS[name]


class TrainTransform:
    """`bytes -> np.uint8 [S, S, 3]`: Inception crop fused into decoding, then the albumentations pipeline.

    Randomness follows torch's global generator, as torchvision/timm transforms do: each call draws one number
    from it and re-seeds this transform's private generators (a numpy one for the crop, shared with every
    albumentations transform, and albumentations' python one) from that draw and the rank. Hence DataLoader workers
    (each torch-seeded base_seed + worker id) never repeat each other, torch.manual_seed / seed_everything makes
    runs reproducible, data_pipes.stream's per-batch torch re-seeding makes a resumed batch augment identically,
    and DDP ranks that share a seed still augment differently. Costs ~13 us per call.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        interpolation: str,
        pipeline: A.Compose | None,
        dct_reduce: bool = True,
    ):
        self.img_size = img_size
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation
        self.pipeline = pipeline
        self.dct_reduce = dct_reduce
        self._rng = np.random.default_rng(0)
        self._py_rng = random.Random(0)
        if pipeline is not None:
            # One shared stream for the whole pipeline: Compose(seed=...) would give every nested transform its own
            # generator with the *same* seed, so e.g. two RandAugment layers would always pick the same op.
            pipeline.set_random_state(self._rng, self._py_rng)

    def _reseed_from_torch(self) -> None:
        draw = int(torch.randint(0, 2**62, ()).item())
        # PCG64's raw state and stream set from a hash of (draw, rank): a SeedSequence would cost 10 us per image.
        # In place, so the generators the albumentations transforms hold see the new state without a tree walk.
        digest = hashlib.blake2b(f"{draw},{_rank()}".encode(), digest_size=32).digest()
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(digest[:16], "little"), "inc": int.from_bytes(digest[16:], "little") | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        self._py_rng.seed(int(self._rng.integers(2**62)))

    def __call__(self, data: bytes) -> np.ndarray:
        self._reseed_from_torch()
        img = open_image(data)
        box = random_resized_box(img.width, img.height, self.scale, self.ratio, self._rng)
        out = crop_resize(img, box, self.img_size, self._pick_interpolation(), reduce=self.dct_reduce)
        if self.pipeline is not None:
            out = self.pipeline(image=out)["image"]
        return _writable(out)

    def _pick_interpolation(self) -> str:
        if self.interpolation != "random":
            return self.interpolation
        return _RANDOM_INTERP[int(self._rng.integers(2))]

    def __repr__(self) -> str:
        return (f"TrainTransform(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation!r}, pipeline={self.pipeline!r})")


class EvalTransform:
    """`bytes -> np.uint8 [S, S, 3]`: timm's eval resize + centre crop, from a DCT-reduced decode where possible."""

    def __init__(self, img_size: int, crop_pct: float, interpolation: str, dct_reduce: bool = True):
        if _resample(interpolation) is None:
            raise ValueError("eval interpolation must be deterministic, not 'random'")
        eval_resize_size(img_size, img_size, img_size, crop_pct)  # validates crop_pct now, not per sample
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self.dct_reduce = dct_reduce

    def __call__(self, data: bytes) -> np.ndarray:
        out = center_crop(open_image(data), self.img_size, self.crop_pct, self.interpolation, reduce=self.dct_reduce)
        return _writable(out)

    def __repr__(self) -> str:
        return (f"EvalTransform(img_size={self.img_size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation!r})")


def build_train_transform(
    img_size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    randaugment: Mapping[str, Any] | None = None,
    autoaugment: str | None = None,
    color_jitter: Mapping[str, Any] | None = None,
    random_erasing: Mapping[str, Any] | None = None,
    dct_reduce: bool = True,
) -> TrainTransform:
    """Build the train transform from `conf/aug/<recipe>.yaml: train` (dicts or DictConfigs both work).

    interpolation: resize filter of the crop (nearest, bilinear, bicubic, lanczos, box, hamming, or 'random' =
    bilinear/bicubic per sample as timm's train default); timm/torchvision policy ops use it too.
    """
    scale_t, ratio_t = _pair(scale, "scale"), _pair(ratio, "ratio")
    if not (0 < scale_t[0] <= scale_t[1] <= 1 and 0 < ratio_t[0] <= ratio_t[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale_t}, {ratio_t}")
    _resample(interpolation)
    pipeline = _pipeline(
        interpolation,
        float(hflip),
        _parse(RandAugmentConfig, randaugment, "randaugment"),
        None if autoaugment is None else str(autoaugment),
        _parse(ColorJitterConfig, color_jitter, "color_jitter"),
        _parse(RandomErasingConfig, random_erasing, "random_erasing"),
    )
    return TrainTransform(int(img_size), scale_t, ratio_t, str(interpolation), pipeline, bool(dct_reduce))


def build_eval_transform(
    img_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear", *, dct_reduce: bool = True
) -> EvalTransform:
    """Decode + resize shorter side to int(img_size / crop_pct) + centre crop img_size (timm's eval transform)."""
    return EvalTransform(int(img_size), float(crop_pct), str(interpolation), bool(dct_reduce))


def _pair(value: Sequence[float], key: str) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{key} must have two values, got {list(value)}")
    return float(value[0]), float(value[1])
