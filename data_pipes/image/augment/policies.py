"""RandAugment and AutoAugment: the op lists and policy tables of TF Model Garden, timm and torchvision, and the
`randaugment:` config; composed from `policy_ops.PolicyOp` with albumentations' `OneOf` / `Sequential`."""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
from timm.data import IMAGENET_DEFAULT_MEAN

from data_pipes.image.augment.policy_ops import OpStyle, PolicyOp

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


@dataclass(frozen=True)
class RandAugmentConfig:
    """`randaugment:` in conf/aug/*.yaml. Defaults are TF Model Garden's RandAugment config."""

    num_ops: int = 2
    magnitude: float = 10.0
    prob: float = 1.0  # per layer; TF prob_to_apply (None = 1.0), timm 'p' (its default is 0.5)
    magnitude_std: float = 0.0
    magnitude_max: float | None = None  # clip bound; None = 10 for timm, max(10, magnitude) for tf
    exclude: tuple[str, ...] = ()
    flavor: str = "tf"  # tf | timm: op list and argument ranges (see data_pipes.image.augment.policy_ops)
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


def randaugment_ops(cfg: RandAugmentConfig) -> tuple[str, ...]:
    """The ops one RandAugment layer chooses from (identity aside), after `exclude`."""
    ops = TF_RANDAUGMENT_OPS if cfg.flavor == "tf" else TIMM_RANDAUGMENT_OPS
    return tuple(op for op in ops if op not in cfg.exclude)


def randaugment_style(cfg: RandAugmentConfig, interpolation: str) -> tuple[OpStyle, float]:
    """The op style of a RandAugment config and the magnitude its draws are clipped to."""
    if cfg.flavor == "tf":
        style = OpStyle("tf", 10.0, (128, 128, 128), "nearest", cfg.translate_const, cfg.cutout_const)
        return style, cfg.magnitude_max if cfg.magnitude_max is not None else max(10.0, cfg.magnitude)
    style = OpStyle("timm_inc" if cfg.increasing else "timm", 10.0, _mean_fill(), interpolation)
    return style, cfg.magnitude_max if cfg.magnitude_max is not None else 10.0


def build_randaugment(cfg: RandAugmentConfig, interpolation: str) -> A.BaseCompose:
    style, upper = randaugment_style(cfg, interpolation)

    def layer() -> A.OneOf:
        ops = [PolicyOp(op, cfg.magnitude, style, cfg.magnitude_std, upper) for op in randaugment_ops(cfg)]
        if cfg.flavor == "tf":
            ops.append(A.NoOp(p=1.0))  # TF's switch_case default branch: one extra 'identity' choice
        return A.OneOf(ops, p=cfg.prob)

    return A.Sequential([layer() for _ in range(cfg.num_ops)], p=1.0)


def build_autoaugment(policy: str, interpolation: str) -> A.BaseCompose:
    if policy == "imagenet":
        style, table = OpStyle("torchvision", 9.0, (0, 0, 0), interpolation), _POLICY_IMAGENET
    elif policy == "v0":
        # TF AutoAugment config defaults: translate_const 250, cutout_const 100.
        style, table = OpStyle("tf", 10.0, (128, 128, 128), "nearest", 250.0, 100.0), _POLICY_V0
    else:
        raise ValueError(f"autoaugment must be one of {AUTOAUGMENT_POLICIES} or null, got {policy!r}")
    # The upper bound never clips a policy's fixed magnitudes.
    sub_policies = [
        A.Sequential([PolicyOp(op, m, style, 0.0, 10.0, p=prob) for op, prob, m in sub], p=1.0) for sub in table
    ]
    return A.OneOf(sub_policies, p=1.0)


def _mean_fill() -> tuple[int, int, int]:
    return tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)  # timm's img_mean hparam
