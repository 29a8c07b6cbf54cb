"""Train and eval transforms: `bytes -> np.uint8 [S, S, 3]` RGB, picklable, one call per sample.

Train = fused decode + Inception crop (data_pipes.image.decode: the random-resized-crop box is drawn on the header
geometry, the JPEG decoded DCT-reduced when the box is large, and only the box resampled to S x S), then an
albumentations pipeline on the S x S image: horizontal flip -> AutoAugment | RandAugment -> colour jitter ->
random erasing (timm's order). Eval = decode (DCT-reduced when possible) + resize shorter side to
int(S / crop_pct) + centre crop S (timm's eval transform).

albumentations 2.0.x is its last MIT release (its successor is AGPL), so this package is the only code that
imports it; swapping the engine means rewriting this package only:
- `transforms`: the train/eval transforms and their builders (what the rest of the project calls);
- `policies`: RandAugment and AutoAugment (op lists, policy tables, config) built from
- `policy_ops`: each policy op as an albumentations transform, with its TF/timm/torchvision argument ranges;
- `erasing`: timm's random erasing on uint8 pixels.
"""

import os

# albumentations queries PyPI on every import (2 s timeout, in every spawned worker too) and advises upgrading,
# which here would mean its AGPL successor; pinned at 2.0.x, the check is only a cost. Set before any submodule
# imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from data_pipes.image.augment.erasing import RandomErasing, RandomErasingConfig  # noqa: E402
from data_pipes.image.augment.policies import AUTOAUGMENT_POLICIES, RandAugmentConfig, randaugment_ops  # noqa: E402
from data_pipes.image.augment.policy_ops import PolicyOp  # noqa: E402
from data_pipes.image.augment.transforms import (  # noqa: E402
    ColorJitterConfig,
    EvalTransform,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
)

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
