"""Callbacks and checkpoint I/O: what every run gets besides the module and the data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    ThroughputMonitor,
)


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


def image_count(batch: dict[str, Any]) -> int:
    return batch["image"].size(0)


def build_callbacks(
    run_dir: Path, *, every_n_train_steps: int, save_top_k: int, lr_monitor: bool, ema_decay: float | None,
    record: RunRecord, has_logger: bool,
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
    if has_logger:
        callbacks.append(ThroughputMonitor(batch_size_fn=image_count))
        if lr_monitor:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    if ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=ema_decay))
    return callbacks
