"""Distillation objectives: drop-in replacements for `train.objective.ClassificationObjective`.

- `SoftTargetDistillation` (the MNv4 recipe): cross-entropy between the teacher's distribution and the student's,
  the teacher's distribution being the stored top-k of a built kd set, or the teacher run on the device on the
  same view (online). Temperature T softens both sides (x T^2, so gradients keep their scale); T = 1 is the paper's.
- `LogitDistillation` (classic online KD, timm's `LogitDistillationTask` semantics): the label loss plus the KL
  divergence of the student's from the teacher's tempered distribution, x T^2, each with its weight.

Both return a dict of terms (the step logs every one): `loss`, the loss of each source present, and
`teacher_agree`, the percentage of samples whose student and teacher top-1 agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from distill.teacher import Teacher

MISSING_MASS = ("uniform", "renormalize")


def dense_targets(ids: Tensor, probs: Tensor, num_classes: int, missing_mass: str) -> Tensor:
    """Stored top-k (ids [B, k], probs [B, k]) -> a distribution over all classes [B, C].

    The mass outside the top-k (1 - sum of the stored probabilities) is spread evenly over the other classes
    (`uniform`, as FKD does) or dropped by renormalising the top-k (`renormalize`)."""
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"kd.missing_mass must be one of {MISSING_MASS}, got {missing_mass!r}")
    probs = probs.float()
    mass = probs.sum(dim=1, keepdim=True)
    if missing_mass == "renormalize":
        dense = torch.zeros(ids.size(0), num_classes, device=probs.device)
        return dense.scatter_(1, ids, probs / mass.clamp_min(1e-12))
    rest = (1.0 - mass).clamp_min(0.0) / max(1, num_classes - ids.size(1))
    dense = rest.expand(ids.size(0), num_classes).clone()
    return dense.scatter_(1, ids, probs)


def sharpen(dist: Tensor, temperature: float) -> Tensor:
    """softmax(z / T) from softmax(z): p^(1/T), renormalised."""
    if temperature == 1.0:
        return dist
    powered = dist.clamp_min(1e-12).pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


class SoftTargetDistillation(nn.Module):
    def __init__(self, *, num_classes: int, temperature: float, missing_mass: str, source_names: Sequence[str],
                 teacher: Teacher | None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {temperature}")
        self.num_classes, self.temperature, self.missing_mass = num_classes, temperature, missing_mass
        self.source_names = tuple(source_names)
        self.teacher = teacher  # a plain holder: not a submodule, not in checkpoints (distill.teacher)

    def place(self, device: torch.device) -> None:
        if self.teacher is not None:
            self.teacher.to(device)

    def teacher_distribution(self, batch: dict) -> Tensor:
        if "kd_probs" in batch:  # a built set: the teacher's stored view labels, at T = 1
            stored = dense_targets(batch["kd_ids"], batch["kd_probs"], self.num_classes, self.missing_mass)
            return sharpen(stored, self.temperature)
        if self.teacher is None or "teacher_image" not in batch:
            raise RuntimeError("online distillation needs the teacher and the batch's teacher_image")
        return self.teacher.probabilities(batch["teacher_image"], self.temperature)

    def forward(self, logits: Tensor, targets: Tensor, images: Tensor, batch: dict) -> dict[str, Tensor]:
        target = self.teacher_distribution(batch)
        t = self.temperature
        with torch.autocast(logits.device.type, enabled=False):  # the cross-entropy of two fp32 distributions
            per_sample = -(target * F.log_softmax(logits.float() / t, dim=1)).sum(dim=1) * (t * t)
        valid = batch["valid"].to(per_sample.dtype)
        loss = (per_sample * valid).sum() / valid.sum().clamp_min(1.0)
        terms = {"loss": loss}
        with torch.no_grad():
            if "source" in batch:
                # No data-dependent branch (a host read each step): every batch holds B * w / sum(w) samples of each
                # source (MixtureStream), so the count is 0 only when all of a source's samples failed to decode.
                for s, name in enumerate(self.source_names):
                    mine = (batch["source"] == s).to(per_sample.dtype) * valid
                    terms[f"loss_{name}"] = (per_sample * mine).sum() / mine.sum().clamp_min(1.0)
            agree = (logits.argmax(dim=1) == target.argmax(dim=1)).to(per_sample.dtype)
            terms["teacher_agree"] = 100.0 * (agree * valid).sum() / valid.sum().clamp_min(1.0)
        return terms


class LogitDistillation(nn.Module):
    """`task_weight` x label loss + `distill_weight` x T^2 KL(teacher_T || student_T) (timm train.py --kd-*)."""

    def __init__(self, *, teacher: Teacher, temperature: float, task_weight: float, distill_weight: float,
                 label_smoothing: float, student_mean: Sequence[float], student_std: Sequence[float]) -> None:
        super().__init__()
        self.teacher, self.temperature = teacher, temperature
        self.task_weight, self.distill_weight = task_weight, distill_weight
        self.hard = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.soft = SoftTargetCrossEntropy()
        self.register_buffer("student_mean", torch.tensor(student_mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std).view(1, -1, 1, 1) * 255, persistent=False)

    def place(self, device: torch.device) -> None:
        self.teacher.to(device)

    def teacher_input(self, images: Tensor, targets: Tensor, batch: dict) -> Tensor:
        """The teacher's uint8 view: the loader's own (from the uint8 view at its resolution), or, when batch mixing
        made the student's images, those mixed pixels resized to its resolution (mixing commutes with normalising)."""
        if targets.ndim == 1 and "teacher_image" in batch:
            return batch["teacher_image"]
        pixels = (images.float() * self.student_std + self.student_mean).clamp(0, 255)
        size = self.teacher.img_size
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return pixels.round().to(torch.uint8)

    def forward(self, logits: Tensor, targets: Tensor, images: Tensor, batch: dict) -> dict[str, Tensor]:
        task = self.soft(logits, targets) if targets.ndim == 2 else self.hard(logits, targets)
        teacher_logits = self.teacher.logits(self.teacher_input(images, targets, batch))
        t = self.temperature
        with torch.autocast(logits.device.type, enabled=False):  # both distributions from fp32 logits
            kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                          reduction="batchmean", log_target=True) * (t * t)
        with torch.no_grad():
            agree = 100.0 * (logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
        return {"loss": self.task_weight * task + self.distill_weight * kd, "task_loss": task.detach(),
                "kd_loss": kd.detach(), "teacher_agree": agree}
