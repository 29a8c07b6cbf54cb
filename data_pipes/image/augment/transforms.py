"""The train and eval transforms (`bytes -> np.uint8 [S, S, 3]`) and their builders from `conf/aug`."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import albumentations as A
import numpy as np
import torch

from data_pipes.image.augment.erasing import RandomErasing, RandomErasingConfig
from data_pipes.image.augment.policies import RandAugmentConfig, build_autoaugment, build_randaugment
from data_pipes.image.augment.policy_ops import RANDOM_INTERPOLATIONS
from data_pipes.image.decode import (
    INTERPOLATIONS,
    center_crop,
    crop_resize,
    eval_resize_size,
    open_image,
    random_resized_box,
)


@dataclass(frozen=True)
class ColorJitterConfig:
    """`color_jitter:` (torchvision/timm semantics: factors uniform in [1 - x, 1 + x], hue in [-h, h])."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    prob: float = 1.0


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
        steps.append(build_autoaugment(autoaugment, interpolation))
    if randaugment is not None and randaugment.num_ops > 0:
        steps.append(build_randaugment(randaugment, interpolation))
    if color_jitter is not None:
        steps.append(_color_jitter(color_jitter))
    if random_erasing is not None and random_erasing.prob > 0:
        steps.append(RandomErasing(random_erasing))
    return A.Compose(steps, p=1.0, is_check_shapes=False) if steps else None


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _writable(arr: np.ndarray) -> np.ndarray:
    # PIL hands out read-only arrays; torch.as_tensor in the collate warns on them and they cannot be edited in place.
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")


def _check_interpolation(name: str, *, allow_random: bool) -> None:
    if name == "random" and not allow_random:
        raise ValueError("eval interpolation must be deterministic, not 'random'")
    if name not in INTERPOLATIONS and name != "random":
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)} or 'random', got {name!r}")


class TrainTransform:
    """`bytes -> np.uint8 [S, S, 3]`: Inception crop fused into decoding, then the albumentations pipeline.

    Randomness follows torch's global generator, as torchvision/timm transforms do: each call draws one number
    from it and re-seeds this transform's private generators (a numpy one for the crop, shared with every
    albumentations transform, and albumentations' python one) from that draw and the rank. Hence DataLoader workers
    (each torch-seeded base_seed + worker id) never repeat each other, torch.manual_seed / seed_everything makes
    runs reproducible, data_pipes.stream.loader's per-batch torch re-seeding makes a resumed batch augment identically,
    and DDP ranks that share a seed still augment differently. Costs ~13 us per call.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        interpolation: str,
        pipeline: A.Compose | None,
        dct_reduce: bool,
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
        return RANDOM_INTERPOLATIONS[int(self._rng.integers(2))]

    def __repr__(self) -> str:
        return (f"TrainTransform(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation!r}, pipeline={self.pipeline!r})")


class EvalTransform:
    """`bytes -> np.uint8 [S, S, 3]`: timm's eval resize + centre crop; with `dct_reduce`, from a DCT-reduced decode
    where the resized size allows (faster, but not the standard eval pixels)."""

    def __init__(self, img_size: int, crop_pct: float, interpolation: str, dct_reduce: bool):
        _check_interpolation(interpolation, allow_random=False)
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
                f"interpolation={self.interpolation!r}, dct_reduce={self.dct_reduce})")


def build_train_transform(
    img_size: int,
    *,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    interpolation: str,
    randaugment: Mapping[str, Any] | None = None,
    autoaugment: str | None = None,
    color_jitter: Mapping[str, Any] | None = None,
    random_erasing: Mapping[str, Any] | None = None,
    dct_reduce: bool,
) -> TrainTransform:
    """Build the train transform from `conf/aug/<recipe>.yaml: train` (dicts or DictConfigs both work); the recipe
    files are the only place its values are chosen, so the crop and flip settings have no defaults here.
    `dct_reduce` (config: data.train_dct_reduce) decodes a JPEG at 1/2..1/8 scale when the crop box is large enough
    to be resized down to the crop size from there (libjpeg-turbo's DCT scaling: the crop's pixels are then
    slightly softer than a full decode's; bench.loader measures what it buys).

    interpolation: resize filter of the crop (nearest, bilinear, bicubic, lanczos, box, hamming, or 'random' =
    bilinear/bicubic per sample as timm's train default); timm/torchvision policy ops use it too.
    """
    scale_t, ratio_t = _pair(scale, "scale"), _pair(ratio, "ratio")
    if not (0 < scale_t[0] <= scale_t[1] <= 1 and 0 < ratio_t[0] <= ratio_t[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale_t}, {ratio_t}")
    _check_interpolation(interpolation, allow_random=True)
    pipeline = _pipeline(
        interpolation,
        float(hflip),
        _parse(RandAugmentConfig, randaugment, "randaugment"),
        None if autoaugment is None else str(autoaugment),
        _parse(ColorJitterConfig, color_jitter, "color_jitter"),
        _parse(RandomErasingConfig, random_erasing, "random_erasing"),
    )
    return TrainTransform(int(img_size), scale_t, ratio_t, str(interpolation), pipeline, bool(dct_reduce))


def build_eval_transform(img_size: int, crop_pct: float, interpolation: str, *, dct_reduce: bool) -> EvalTransform:
    """Decode + resize shorter side to int(img_size / crop_pct) + centre crop img_size (timm's eval transform).
    crop_pct and interpolation come from the model's timm data config (`resolve_model_data_config`); `dct_reduce`
    (config: data.eval_dct_reduce, off by default) decodes JPEGs at 1/2, 1/4 or 1/8 scale where the resize allows,
    which is faster but changes the pixels top-1 is measured on (timm's validate.py decodes in full)."""
    return EvalTransform(int(img_size), float(crop_pct), str(interpolation), bool(dct_reduce))


def _pair(value: Sequence[float], key: str) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{key} must have two values, got {list(value)}")
    return float(value[0]), float(value[1])
