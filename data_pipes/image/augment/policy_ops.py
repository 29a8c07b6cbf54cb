"""AutoAugment/RandAugment ops as albumentations transforms, with TF, timm and torchvision argument ranges.

albumentations has no AutoAugment/RandAugment, and its stock transforms draw from ranges, while these policies
need a fixed magnitude (plus optional Gaussian noise), a random sign, TF/PIL geometry (shear about the top-left
corner, fill colours) and a per-layer apply probability. So each policy op is a small `A.ImageOnlyTransform`
(`PolicyOp`) whose randomness comes from albumentations' seeded generators and whose pixels are albumentations
kernels (`warp_affine`, `equalize`, `solarize`, `posterize`, `auto_contrast`, `invert`, `adjust_*_torchvision`,
`convolve`).

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

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.pixel import functional as fpixel

_CV2_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
               "lanczos": cv2.INTER_LANCZOS4}
RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")  # timm's 'random' train interpolation
_IDENTITY = np.eye(3)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL ImageFilter.SMOOTH


@dataclass(frozen=True)
class OpStyle:
    """How a policy maps magnitudes to op arguments, and the fill/interpolation of its geometric ops."""

    name: str  # tf | timm | timm_inc | torchvision
    full_scale: float  # magnitude at which each op reaches its nominal maximum
    fill: tuple[int, int, int]
    interpolation: str  # a _CV2_INTERP key or 'random'
    translate_const: float = 0.0
    cutout_const: float = 0.0


def _rotate_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> float:
    return 30.0 * f * sign


def _shear_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> float:
    return 0.3 * f * sign


def _translate_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> float:
    size = hw[1] if axis == 0 else hw[0]
    if style.name == "tf":
        return style.translate_const * f * sign
    if style.name == "torchvision":
        return int(150.0 / 331.0 * size * f) * sign
    return 0.45 * f * size * sign


def _enhance_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> float:
    if style.name in ("tf", "timm"):
        return 0.1 + 1.8 * f  # legacy TF mapping: below 1 under m5, above 1 over it; never signed
    factor = 1.0 + 0.9 * f * sign
    return max(0.1, factor) if style.name == "timm_inc" else factor


def _posterize_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> int:
    if style.name == "torchvision":
        bits = 8 - round(4 * f)
    else:
        bits = int(4 * f)
        bits = 4 - bits if style.name == "timm_inc" else bits
    return min(max(bits, 0), 8)


def _solarize_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> float:
    if style.name == "torchvision":
        return 255.0 * (1.0 - f)
    threshold = int(256 * f)
    if style.name == "tf":
        return threshold
    threshold = min(256, threshold)
    return 256 - threshold if style.name == "timm_inc" else threshold


def _solarize_add_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> int:
    addition = int(110 * f)
    return addition if style.name == "tf" else min(128, addition)


def _cutout_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> int:
    return int(style.cutout_const * f)


def _no_arg(f: float, sign: float, style: OpStyle, hw: tuple[int, int], axis: int) -> None:
    return None


_ARGUMENTS = {
    "AutoContrast": _no_arg, "Equalize": _no_arg, "Invert": _no_arg,
    "Rotate": _rotate_arg, "ShearX": _shear_arg, "ShearY": _shear_arg,
    "TranslateX": _translate_arg, "TranslateY": _translate_arg,
    "Color": _enhance_arg, "Contrast": _enhance_arg, "Brightness": _enhance_arg, "Sharpness": _enhance_arg,
    "Posterize": _posterize_arg, "Solarize": _solarize_arg, "SolarizeAdd": _solarize_add_arg, "Cutout": _cutout_arg,
}


def _warp(img: np.ndarray, inverse: np.ndarray, fill: tuple[int, int, int], interp: int) -> np.ndarray:
    # albumentations' warp_affine without its per-call wrappers (which cost as much as the warp itself on a 224 px
    # view): the same near-identity shortcut (np.allclose's test) and the same cv2 call. The matrices are
    # PIL/TF-style output -> input maps, hence WARP_INVERSE_MAP.
    if (np.abs(inverse - _IDENTITY) <= 1e-8 + 1e-5 * _IDENTITY).all():
        return img
    height, width = img.shape[:2]
    return cv2.warpAffine(img, inverse[:2], (width, height), flags=interp | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(fill))


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


def cv2_interpolation(name: str) -> int:
    """OpenCV's flag for a filter name (bilinear for names OpenCV lacks)."""
    return _CV2_INTERP.get(name, cv2.INTER_LINEAR)


def _magnitude(op: PolicyOp, uniform, gauss) -> float:
    if op.magnitude is None:
        return 0.0
    m = float(op.magnitude)
    if op.magnitude_std >= 100:  # timm: mstd > 100 means uniform in [0, m]
        m = uniform(0.0, m)
    elif op.magnitude_std > 0:
        m = gauss(m, op.magnitude_std)
    return min(max(m, 0.0), op.magnitude_max)


def sample_magnitude(op: PolicyOp, rng: np.random.Generator) -> float:
    """A magnitude for one call of `op`, drawn as the op itself draws it, from a numpy generator (for views whose
    parameters are stored, data_pipes.image.views)."""
    return _magnitude(op, rng.uniform, rng.normal)


class PolicyOp(A.ImageOnlyTransform):
    """One AutoAugment/RandAugment op at a magnitude; argument, sign and interpolation are drawn per call."""

    def __init__(
        self,
        op: str,
        magnitude: float | None,
        style: OpStyle,
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
        return _magnitude(self, self.py_random.uniform, self.py_random.gauss)

    def _sample_interpolation(self) -> int:
        name = self.style.interpolation
        if name == "random":
            name = RANDOM_INTERPOLATIONS[self.py_random.random() < 0.5]
        return cv2_interpolation(name)

    def apply(self, img: np.ndarray, level: float, sign: float, resample: int, center: tuple[float, float],
              **params: Any) -> np.ndarray:
        axis = 1 if self.op.endswith("Y") else 0
        arg = _ARGUMENTS[self.op](level, sign, self.style, img.shape[:2], axis)
        if self.op == "Cutout":
            return _cutout(img, arg, self.style.fill, center)
        return _KERNELS[self.op](img, arg, self.style.fill, resample)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("op", "magnitude", "magnitude_std", "magnitude_max")
