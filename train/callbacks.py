"""Callbacks and checkpoint I/O: what every run gets besides the module and the data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
    WeightAveraging,
)
from torch import Tensor

from train.throughput import ThroughputLogger


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, fsync, then rename: a preempted or crashed save never leaves half a checkpoint
    where the last good one was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None):
        # Checkpoints hold only tensors and plain Python values, so the safe loader always works.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class RunRecord(Callback):
    """Stores what `python -m train.export` needs to rebuild the network in every checkpoint, as plain values
    (so the checkpoint loads with `torch.load(weights_only=True)`)."""

    def __init__(self, run_config: dict[str, Any], dataset: dict[str, Any], data_config: dict[str, Any]) -> None:
        self.record = {"run_config": run_config, "dataset": dataset, "data_config": data_config}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.record)


class WarmupEMA:
    """EMA update with timm's warm-up: the decay grows as (1 + n) / (10 + n) up to `decay`, so the average is not
    dominated by the random initialisation for the first ~1/(1 - decay) steps (Lightning's EMA has no warm-up)."""

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        if not averaged.is_floating_point():
            return current  # counters, zero points, observer switches: the current model's, never a blend
        decay = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=self.decay) if self.warmup else self.decay
        return averaged + (current - averaged) * (1 - decay)


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging (parameters and buffers) with two corrections for fake-quant networks:
    - per-channel observers size their range buffers on the first forward, after the average was copied, so an
      averaged tensor whose shape the model has since changed takes the model's tensor before the update;
    - the swap that puts the averaged tensors in for validation also swaps in the observers' on/off switches the
      average copied while training, so the network is switched to eval again after it (observers stay off
      whenever it evaluates);
    - on resume, the averaged copy's `load_state_dict` left the fake-quant modules' `eps` buffers at their default
      (1.2e-7 instead of the checkpoint's 2^-12), so every averaged tensor is also copied by name from the
      checkpoint."""

    _shapes_checked = False

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None or "averaging_state" not in checkpoint:
            return
        state = checkpoint["state_dict"]
        module = self._average_model.module
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if name in state and state[name].shape == tensor.shape:
                    tensor.copy_(state[name])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._average_model is not None and not self._shapes_checked:
            # Once: after the first forward every buffer has its final shape (not on the hot path after that).
            averaged = self._average_model.module
            for mine, theirs in zip(averaged.buffers(), pl_module.buffers()):
                if mine.shape != theirs.shape:
                    mine.data = theirs.detach().clone().to(mine.device)
            self._shapes_checked = True
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        pl_module.eval()


def image_count(batch: dict[str, Any]) -> int:
    return batch["image"].size(0)


def build_callbacks(
    run_dir: Path, *, every_n_train_steps: int, save_top_k: int, lr_monitor: bool, ema_decay: float | None,
    ema_warmup: bool, record: RunRecord, has_logger: bool, progress_refresh: int | None,
) -> list[Callback]:
    checkpoints = run_dir / "checkpoints"
    # Both write the same last.ckpt (every N steps, and after each validation), so `ckpt_path=last` always finds
    # the newest state under one name; the version counter would otherwise make last-v1.ckpt.
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=checkpoints, filename="step-{step}", every_n_train_steps=every_n_train_steps,
                        save_last=True, save_top_k=0, enable_version_counter=False),
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/acc1", mode="max", save_top_k=save_top_k,
                        save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        record,
    ]
    if progress_refresh:
        # Refreshing reads the loss from the device: once per logging interval, not every step.
        callbacks.append(TQDMProgressBar(refresh_rate=progress_refresh))
    if has_logger:
        callbacks.append(ThroughputLogger(batch_size_fn=image_count))
        if lr_monitor:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    if ema_decay is not None:
        # Validation and checkpoints use the averaged weights; at the end they replace the trained ones (export).
        callbacks.append(EMAWeights(avg_fn=WarmupEMA(ema_decay, ema_warmup), use_buffers=True))
    return callbacks
