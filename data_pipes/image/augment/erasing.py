"""timm's random erasing, on the uint8 image (normalisation happens later, on the device)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


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
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        if self.mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random_erasing.mode must be pixel, rand or const, got {self.mode!r}")


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
