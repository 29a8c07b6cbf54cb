"""The LightningModule: a timm network, the objective it minimises, and the metrics it reports.

Optional features plug in as components (built in `train.run`): the batch mixing (Mixup/CutMix or a no-op), the
objective (label loss, or a distillation loss with its teacher), the network itself (float, or a fake-quant
version of it for QAT), and EMA (Lightning's EMAWeightAveraging callback). The steps stay the same for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from train.nets.normalize import normalize_images
from train.optim import OptimizerFactory, SchedulerFactory

BatchMixing = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class NoValExtras(nn.Module):
    """No validation metrics beyond the module's own."""

    def place(self, device) -> None:
        """Nothing to move."""

    def update(self, logits: Tensor, batch: dict[str, Any]) -> None:
        """Nothing to count."""

    def compute(self) -> dict[str, Tensor]:
        return {}

    def reset(self) -> None:
        """Nothing to reset."""


class ImageClassifier(LightningModule):
    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        objective: nn.Module,
        batch_mixing: BatchMixing,
        val_extras: nn.Module | None = None,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory,
        updates_per_epoch: Callable[[], int],
        channels_last: bool,
        macs_per_image: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.batch_mixing = batch_mixing
        # More validation metrics from a component (distillation: the teacher's top-1 and the agreement with it).
        self.val_extras = val_extras if val_extras is not None else NoValExtras()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.updates_per_epoch = updates_per_epoch
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("mean", torch.tensor(mean) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std) * 255, persistent=False)
        top_k = min(5, num_classes)
        # Train top-1 hits, top-k hits and images of the current epoch, summed on the device (not a buffer: EMA
        # would average it, and checkpoints do not need it).
        self._train_counts = torch.zeros(3, dtype=torch.long)
        self.num_classes, self.top_k = num_classes, top_k
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.val_loss = MeanMetric()
        self.val_images = SumMetric()
        self.val_acc1_best = MaxMetric()
        self.val_acc5_best = MaxMetric()
        for best in (self.val_acc1_best, self.val_acc5_best):
            best.persistent(True)  # a resumed run keeps its best so far
        # ThroughputLogger reports FLOP/s from flops_per_batch: forward + backward ~ 3x the forward (2 FLOPs/MAC).
        self.flops_per_image = None if macs_per_image is None else 6 * macs_per_image
        self.flops_per_batch: float | None = None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch["image"] = images = normalize_images(batch["image"], self.mean, self.std, self.memory_format)
        if self.flops_per_image is not None:
            self.flops_per_batch = self.flops_per_image * images.size(0)
        return batch

    def on_fit_start(self) -> None:
        self.objective.place(self.device)
        self.val_extras.place(self.device)

    def on_validation_start(self) -> None:
        self.val_extras.place(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, targets = self.batch_mixing(batch["image"], batch["target"])
        logits = self(images)
        losses = self.objective(logits, targets, images, batch)
        self._log_train(losses, logits, batch["target"])
        return losses["loss"]

    def _log_train(self, losses: dict[str, Tensor], logits: Tensor, labels: Tensor) -> None:
        # Every step only adds to device-side counters (no host sync, no Lightning bookkeeping); values are logged on
        # logging steps (the batch's loss and accuracy) and at the epoch's end (the exact epoch accuracy). Samples
        # without a label (-1: the extra data of distillation) are not counted.
        with torch.no_grad():
            labelled = labels >= 0
            hits = logits.topk(self.top_k, dim=1).indices.eq(labels.unsqueeze(1)) & labelled.unsqueeze(1)
            counts = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), labelled.sum()])
        if self._train_counts.device != counts.device:  # on_train_epoch_start is skipped on a mid-epoch restart
            self._train_counts = self._train_counts.to(counts.device)
        self._train_counts += counts
        if not self._is_logging_step():
            return
        batch_size = labels.numel()
        seen = counts[2].clamp_min(1)
        accuracy = {"train/acc1": counts[0] * 100.0 / seen, "train/acc5": counts[1] * 100.0 / seen}
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True, batch_size=batch_size)
        self.log_dict(accuracy, batch_size=batch_size)

    def _is_logging_step(self) -> bool:
        # Lightning's own cadence (what LearningRateMonitor asks too): values logged on other steps are dropped.
        return self.trainer._logger_connector.should_update_logs

    def on_train_epoch_start(self) -> None:
        self._train_counts = torch.zeros(3, dtype=torch.long, device=self.device)

    def _summed_train_counts(self) -> Tensor:
        """The epoch's train counts summed over ranks. The reduce runs on the module's device, where NCCL needs it:
        counts restored from a checkpoint are on the CPU until a training step moves them, and a checkpoint written
        after an epoch's last validation resumes straight into the epoch's end, with no step in between."""
        self._train_counts = self._train_counts.to(self.device)
        return self.trainer.strategy.reduce(self._train_counts.clone(), reduce_op="sum")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The epoch's train counts so far, summed over ranks (every rank runs this hook for every save): a run resumed
        # mid-epoch then reports the whole epoch's accuracy, not the part after the restart.
        checkpoint["train_counts"] = self._summed_train_counts().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("train_counts")
        if counts is not None:  # rank 0 carries the sum; the others start from zero (the epoch end sums them all)
            self._train_counts = counts.clone() if self.trainer.is_global_zero else torch.zeros_like(counts)

    def on_train_epoch_end(self) -> None:
        hits1, hits5, seen = self._summed_train_counts().tolist()
        if seen:
            self.log_dict({"train/acc1_epoch": 100.0 * hits1 / seen, "train/acc5_epoch": 100.0 * hits5 / seen},
                          sync_dist=False)  # already summed over ranks

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Padding samples (valid=False) keep every rank's batch count equal; they are never counted.
        valid = batch["valid"]
        all_logits = self(batch["image"])
        self.val_extras.update(all_logits, batch)
        logits, targets = all_logits[valid], batch["target"][valid]
        self.val_acc1.update(logits, targets)
        self.val_acc5.update(logits, targets)
        if targets.numel():
            self.val_loss.update(nn.functional.cross_entropy(logits, targets), weight=targets.numel())
        self.val_images.update(valid.sum())

    def on_validation_epoch_end(self) -> None:
        acc1, acc5 = self.val_acc1.compute() * 100, self.val_acc5.compute() * 100
        self.val_acc1_best.update(acc1)
        self.val_acc5_best.update(acc5)
        self.log_dict({
            "val/acc1": acc1, "val/acc5": acc5, "val/loss": self.val_loss.compute(),
            "val/images": self.val_images.compute().float(),
            "val/acc1_best": self.val_acc1_best.compute(), "val/acc5_best": self.val_acc5_best.compute(),
        }, prog_bar=True, sync_dist=False)  # torchmetrics already reduced these over all ranks
        self.log_dict(self.val_extras.compute(), sync_dist=False)
        for metric in (self.val_acc1, self.val_acc5, self.val_loss, self.val_images, self.val_extras):
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.model)
        # Updates per epoch come from the stream's exact plan, not trainer.estimated_stepping_batches, which
        # would set up the dataloaders early and drop their restored position (Lightning #20550).
        scheduler = self.scheduler_factory(optimizer, self.updates_per_epoch())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)
