"""What the training step minimises, and the batch-level mixing in front of it.

The step calls `objective(logits, targets, images, batch)` and logs every term of the returned dict, so a
distillation objective (which reads its teacher's view or the stored teacher labels from the batch) drops in without
touching the step. `place(device)` puts whatever an objective holds outside the module tree (a frozen teacher) on
the step's device.
"""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn


class ClassificationObjective(nn.Module):
    """Label-smoothed cross-entropy; soft-target cross-entropy when mixing has already made soft labels."""

    def __init__(self, label_smoothing: float) -> None:
        super().__init__()
        self.hard = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: Tensor, targets: Tensor, images: Tensor, batch: dict) -> dict[str, Tensor]:
        loss = self.soft(logits, targets) if targets.ndim == 2 else self.hard(logits, targets)
        return {"loss": loss}

    def place(self, device) -> None:
        """Nothing outside the module tree to move."""


class NoMixing:
    """Pass-through stand-in for `timm.data.Mixup` when mixup and cutmix are off."""

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return images, targets


def build_batch_mixing(
    *, num_classes: int, label_smoothing: float, mixup_alpha: float, cutmix_alpha: float, prob: float,
    switch_prob: float, **kwargs,
) -> Mixup | NoMixing:
    """timm's Mixup/CutMix on the device (it folds label smoothing into the soft targets it makes)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0 or prob <= 0:
        return NoMixing()
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes, **kwargs)


