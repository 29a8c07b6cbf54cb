"""The axes runs are compared on, and what a run costs.

Global steps do not line up between runs with different batch sizes, device counts or gradient accumulation;
training images seen (over all ranks) and epochs do. `ComparableAxes` puts both into every row the run logs
(training rows on logging steps, validation rows), and `declare_axes` tells W&B they are axes, so val curves of any
two runs line up by epoch or by images seen. `RunClock` adds up what the run costs over all its segments (requeues,
resumes): wall-clock time, device-hours and the training throughput.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

IMAGES_SEEN = "images_seen"
EPOCH = "epoch"  # fractional: epochs completed at this row (1.0 at the end of the first epoch); Lightning's own
# `epoch` column (the 0-based index of the current epoch) is replaced by it in the rows these callbacks log


def _images(batch: Any) -> int:
    return int(batch["image"].size(0))


class ComparableAxes(Callback):
    """Logs `images_seen` (training images over all ranks since the run began, resumes included) and `epoch`
    (epochs completed, fractional) with every training row and every validation row."""

    def __init__(self) -> None:
        self._base = 0  # images seen over all ranks before this segment (from the checkpoint)
        self._local = 0  # images this rank trained on in this segment: host integers, no device sync per batch

    def images_seen(self, trainer: Trainer, device: torch.device) -> int:
        """Over all ranks: a collective, so every rank calls it at the same points."""
        local = torch.tensor(self._local, dtype=torch.int64, device=device)
        return self._base + int(trainer.strategy.reduce(local, reduce_op="sum"))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._local += _images(batch)
        if trainer._logger_connector.should_update_logs:  # Lightning's logging cadence, the same on every rank
            epochs = trainer.current_epoch + (batch_idx + 1) / max(1, _batches(trainer))
            self._log(pl_module, self.images_seen(trainer, pl_module.device), epochs)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The epoch's own row (train/acc1_epoch, data health): Lightning would stamp it with the epoch's 0-based index.
        self._log(pl_module, self.images_seen(trainer, pl_module.device), _epochs_done(trainer))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._log(pl_module, self.images_seen(trainer, pl_module.device), _epochs_done(trainer))

    @staticmethod
    def _log(pl_module: LightningModule, images: int, epochs: float) -> None:
        # Already global values: no reduction; float64 keeps image counts exact past 2^24.
        pl_module.log_dict({IMAGES_SEEN: torch.tensor(float(images), dtype=torch.float64),
                            EPOCH: torch.tensor(round(epochs, 6), dtype=torch.float64)}, sync_dist=False)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[IMAGES_SEEN] = self.images_seen(trainer, pl_module.device)  # every rank saves: safe collective

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._base, self._local = int(checkpoint.get(IMAGES_SEEN, 0)), 0


def _epochs_done(trainer: Trainer) -> float:
    """Epochs completed, counting the current epoch's completed batches (validation may run mid-epoch)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return trainer.current_epoch + min(1.0, done / max(1, _batches(trainer)))


def _batches(trainer: Trainer) -> int:
    n = trainer.num_training_batches
    return int(n) if n != float("inf") else 0


class RunClock(Callback):
    """Wall-clock seconds, device-seconds (devices x seconds) and training seconds (validation left out) of the run,
    summed over every segment (a requeued or resumed run continues the sums from its checkpoint), and the images
    it trained on per training second."""

    def __init__(self) -> None:
        self.started = time.monotonic()  # made at the start of `train()`: set-up counts as the run's cost too
        self.totals = {"wall_s": 0.0, "device_s": 0.0, "train_s": 0.0, "images": 0}
        self._val_start: float | None = None
        self._val_s = 0.0
        self._train_start: float | None = None
        self._images = 0
        self._devices = 1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._devices = trainer.world_size

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_start = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += _images(batch) * trainer.world_size

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_start is not None:
            self._val_s += time.monotonic() - self._val_start
            self._val_start = None

    def segment(self) -> dict[str, float]:
        """This segment's share so far."""
        now = time.monotonic()
        wall = now - self.started
        train = max(0.0, now - self._train_start - self._val_s) if self._train_start is not None else 0.0
        return {"wall_s": wall, "device_s": wall * self._devices, "train_s": train, "images": self._images}

    def summary(self) -> dict[str, float]:
        """The run's totals, every segment so far included."""
        seg = self.segment()
        total = {k: self.totals[k] + seg[k] for k in self.totals}
        return {"wall_clock_h": total["wall_s"] / 3600, "device_hours": total["device_s"] / 3600,
                "train_images_per_sec": total["images"] / total["train_s"] if total["train_s"] else 0.0,
                "devices": self._devices}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        seg = self.segment()
        checkpoint["run_clock"] = {k: self.totals[k] + seg[k] for k in self.totals}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The interrupted segments up to their last checkpoint (a signal's checkpoint is written as the segment
        # stops; after a crash, the time since the last periodic checkpoint is not counted).
        self.totals = {k: float(v) for k, v in checkpoint.get("run_clock", self.totals).items()}


@rank_zero_only  # other ranks hold a stand-in W&B run
def declare_axes(loggers: Sequence[Logger]) -> None:
    """Tell W&B that `epoch` and `images_seen` are axes: val curves are drawn against epochs by default, and any
    chart can switch to images seen (both are in every row). The best val top-1/top-5 is the summary's value."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.define_metric(EPOCH, hidden=False)
            run.define_metric(IMAGES_SEEN, hidden=False)
            run.define_metric("val/*", step_metric=EPOCH)
            for key in ("val/acc1", "val/acc5"):
                run.define_metric(key, step_metric=EPOCH, summary="max,last")
