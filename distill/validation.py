"""Validation beside the teacher: its own top-1 (measured once, on its own eval preprocessing) and how often the
student's top-1 agrees with its top-1, over all ranks.

The val loader of a distillation run gives each image twice, `image` (the student's eval view) and
`teacher_image` (the teacher's own resize and crop). The teacher runs on the first validation only; its top-1 per
image is kept by sample key, so later validations cost it nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from distill.teacher import Teacher


class TeacherValidation(nn.Module):
    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher  # a plain holder (distill.teacher): not a submodule
        self._top1: dict[str, int] = {}
        self.agree, self.teacher_hits, self.images = SumMetric(), SumMetric(), SumMetric()

    def place(self, device: torch.device) -> None:
        self.teacher.to(device)

    def update(self, logits: Tensor, batch: dict[str, Any]) -> None:
        valid = batch["valid"]
        keys = [k for k, v in zip(batch["key"], valid.tolist()) if v]
        if not keys:
            return
        missing = [k for k in keys if k not in self._top1]
        if missing:
            # The whole batch, padding included: every batch has one shape, so a compiled teacher compiles once.
            predicted = self.teacher.logits(batch["teacher_image"]).argmax(dim=1)[valid].tolist()
            self._top1.update(zip(keys, predicted))
        teacher = torch.tensor([self._top1[k] for k in keys], device=logits.device)
        self.agree.update((logits[valid].argmax(dim=1) == teacher).sum())
        self.teacher_hits.update((batch["target"][valid] == teacher).sum())
        self.images.update(len(keys))

    def compute(self) -> dict[str, Tensor]:
        images = self.images.compute().clamp_min(1)
        return {"val/teacher_agree": 100.0 * self.agree.compute() / images,
                "val/teacher_acc1": 100.0 * self.teacher_hits.compute() / images}

    def reset(self) -> None:
        for metric in (self.agree, self.teacher_hits, self.images):
            metric.reset()


class WithTeacherView:
    """An eval transform that also makes the teacher's eval view of the same bytes (picklable, for loader workers)."""

    def __init__(self, student, teacher) -> None:
        self.student, self.teacher = student, teacher
        # The same preprocessing (size, crop, interpolation): decode once and hand the same pixels to both.
        self.same = repr(student) == repr(teacher)

    def __call__(self, data: bytes) -> dict:
        image = self.student(data)
        return {"image": image, "teacher_image": image if self.same else self.teacher(data)}
