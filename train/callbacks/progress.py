"""Progress for logs that are not a terminal: one plain line per logging interval and per validation."""

from __future__ import annotations

import math
import time
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar


class PlainProgress(ProgressBar):
    """Progress as plain lines, one every `every_n_steps` optimizer steps and one per validation, for output that
    is not a terminal (a Slurm job's log file): a carriage-return bar there is one endless line.

        epoch 3/100 step 1200/50000 | 2,345 img/s | loss 3.412 | lr 1.95e-03 | ETA 5:48:10
        epoch 3/100 val: acc1 41.20 acc5 66.93 (best 41.20)
    """

    def __init__(self, every_n_steps: int) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._images = 0
        self._start = 0.0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._start_step, self._images = time.monotonic(), trainer.global_step, 0

    def _total_steps(self, trainer: Trainer) -> int | None:
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches) \
            if trainer.num_training_batches != float("inf") else None
        limits = [n for n in (trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
                              per_epoch * trainer.max_epochs if per_epoch and trainer.max_epochs else None) if n]
        return min(limits) if limits else None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += image_count(batch) * trainer.world_size
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero) or step % self.every_n_steps or step == self._start_step:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        total = self._total_steps(trainer)
        done = step - self._start_step
        eta = "?" if total is None else _clock((total - step) * elapsed / done)
        loss = trainer.progress_bar_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {step}/{total or '?'} | "
              f"{self._images / elapsed:,.0f} img/s | loss {float(loss):.4g} | lr {lr:.3g} | ETA {eta}"
              if loss is not None else
              f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {step}/{total or '?'} | "
              f"{self._images / elapsed:,.0f} img/s | lr {lr:.3g} | ETA {eta}", flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/acc1" in m:
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} val: acc1 {float(m['val/acc1']):.2f} "
                  f"acc5 {float(m['val/acc5']):.2f} (best {float(m['val/acc1_best']):.2f})", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def image_count(batch: dict[str, Any]) -> int:
    return batch["image"].size(0)
