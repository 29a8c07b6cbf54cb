"""Training throughput (images/s, FLOP/s), measured over each logging interval."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only


class ThroughputLogger(Callback):
    """Logs `perf/images_per_sec` (all ranks), `perf/images_per_sec_per_device` and, when the module sets
    `flops_per_batch`, `perf/tflops_per_sec_per_device`, on every logging step.

    Lightning's ThroughputMonitor synchronises CUDA after every batch to read an exact clock, which keeps the CPU
    from queueing the next step while the GPU works (and, under DDP, holds every rank back with rank 0). Here the
    clock is read, after one synchronisation, once per logging interval; the rate covers that whole interval,
    data-loading stalls included, and validation is left out by restarting the interval after it.
    """

    def __init__(self, batch_size_fn: Callable[[Any], int]) -> None:
        self.batch_size_fn = batch_size_fn
        self._start: float | None = None
        self._images = 0
        self._flops = 0.0
        self._logged_step = -1

    def _restart(self, trainer: Trainer) -> None:
        _synchronize(trainer)
        self._start, self._images, self._flops = time.perf_counter(), 0, 0.0

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart(trainer)

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._restart(trainer)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += self.batch_size_fn(batch)
        self._flops += getattr(pl_module, "flops_per_batch", None) or 0.0
        step = trainer.global_step
        if not step or step == self._logged_step or trainer.log_every_n_steps <= 0 or step % trainer.log_every_n_steps:
            return  # not a logging step, or one already logged (gradient accumulation: no new optimizer step)
        self._logged_step = step
        _synchronize(trainer)
        elapsed = time.perf_counter() - self._start
        per_device = self._images / elapsed
        metrics = {"perf/images_per_sec": per_device * trainer.world_size, "perf/images_per_sec_per_device": per_device}
        if self._flops:
            metrics["perf/tflops_per_sec_per_device"] = self._flops / elapsed / 1e12
        for logger in trainer.loggers:
            # Lightning labels the metrics of the step that makes global_step N with N - 1; the same x for both.
            logger.log_metrics(metrics, step=step - 1)
        self._restart(trainer)


def _synchronize(trainer: Trainer) -> None:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
