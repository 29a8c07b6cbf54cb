"""Tiny LightningModules for the data tests: a linear model on pooled pixels that records what it saw.

Importable from tests (`tests/scripts` is put on sys.path by the test modules) and from the DDP script.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler


class Preempted(RuntimeError):
    """Raised by `KeyRecorder` to simulate a job killed mid-epoch."""


class KeyRecorder(pl.LightningModule):
    """Records (epoch, batch_idx, keys) of every batch it trains on and the valid keys / correct count it
    evaluates; raises `Preempted` at the start of global step `crash_at_step`.

    `schedule`: "steps_per_epoch" sizes a timm cosine schedule from `datamodule.steps_per_epoch`;
    "estimated" reads `trainer.estimated_stepping_batches` (the call that builds the train loader early).
    """

    def __init__(self, num_classes: int, crash_at_step: int | None = None, schedule: str = "steps_per_epoch") -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.crash_at_step, self.schedule = crash_at_step, schedule
        self.trained: list[tuple[int, int, list[str]]] = []
        self.val_keys: list[str] = []
        self.val_correct = 0
        self.train_batches = 0
        self.loader_built_in_configure_optimizers = False

    def _logits(self, batch: dict) -> torch.Tensor:
        return self.head(batch["image"].float().mean(dim=(2, 3)) / 255.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise Preempted(f"simulated preemption at step {self.global_step}")
        self.trained.append((self.current_epoch, batch_idx, list(batch["key"])))
        self.train_batches += 1
        return F.cross_entropy(self._logits(batch), batch["target"])

    def on_validation_epoch_start(self) -> None:
        self.val_keys, self.val_correct = [], 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        valid = batch["valid"]
        hits = (self._logits(batch).argmax(1) == batch["target"]) & valid
        self.val_correct += int(hits.sum())
        self.val_keys += [k for k, v in zip(batch["key"], valid.tolist()) if v]

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        epochs = self.trainer.max_epochs
        if self.schedule == "estimated":
            total = self.trainer.estimated_stepping_batches
            self.loader_built_in_configure_optimizers = self.trainer.train_dataloader is not None
        else:
            total = self.trainer.datamodule.steps_per_epoch(self.trainer.world_size) * epochs
        scheduler = CosineLRScheduler(optimizer, t_initial=total, warmup_t=2, warmup_lr_init=0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers are stepped with the update count, not called like torch ones.
        scheduler.step_update(num_updates=self.global_step)
