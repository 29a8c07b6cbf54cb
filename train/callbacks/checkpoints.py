"""Checkpoints: written atomically, loaded safely, holding what an export needs, and never at a point a resume would
misread.

`StepCheckpoint` is the one writer of `last.ckpt` (every N steps and after every validation, never on a batch a
validation follows); `RunRecord` adds the plain values `python -m train.export` rebuilds the network from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


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
        # Checkpoints hold only tensors and plain Python values, so the safe loader always works. Onto the CPU unless
        # asked otherwise (Lightning's own default): a checkpoint saved on rank 0 holds cuda:0 tensors, which every
        # rank of a node would otherwise deserialize onto GPU 0 (a CUDA context there for each rank, and an error
        # where GPUs are in exclusive-process mode). Lightning moves the restored state to each rank's device.
        return super().load_checkpoint(path, map_location="cpu" if map_location is None else map_location,
                                       weights_only=True)


class RunRecord(Callback):
    """Stores what `python -m train.export` needs to rebuild the network in every checkpoint, as plain values
    (so the checkpoint loads with `torch.load(weights_only=True)`). `network_args`: the arguments the network was
    created with besides its classes (dropout and stochastic-depth rates, after any feature set its own): a QAT
    network's exported graph holds a dropout op, and its observer, only where the rate was above zero, so its
    checkpoint fits only a network rebuilt with the same rates."""

    def __init__(self, run_config: dict[str, Any], dataset: dict[str, Any], data_config: dict[str, Any],
                 provenance: dict[str, Any] | None = None, network_args: dict[str, Any] | None = None) -> None:
        self.record = {"run_config": run_config, "dataset": dataset, "data_config": data_config,
                       "provenance": provenance or {}, "network_args": dict(network_args or {})}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.record)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every N training steps, except on a batch that a validation follows (the epoch's last, or
    a `val_check_interval` batch): Lightning resumes a checkpoint written there as if that validation had run and
    skips it (its loop fast-forwards to the end of evaluation), so the resumed run would miss a validation, its
    best metrics and its checkpoint.

    It is the one writer of last.ckpt: every N steps and after every validation, so last.ckpt is always the newest
    state. (Lightning's monitored checkpoint would write it only when its metric improves, and, if it never did in
    this process, once more at the end of training, after EMA has replaced the trained weights by their average.)"""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not validation_follows(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """No save here: by now EMA has copied its average into the model (the checkpoint would hold it as the
        trained weights), and the final step was saved after the final validation or at its own batch end."""


def validation_follows(trainer: Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates after this training batch (before the next one)."""
    if not trainer.enable_validation:
        return False
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every != 0:
        return False
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return True
    interval = trainer.val_check_batch
    return interval is not None and interval != float("inf") and (batch_idx + 1) % int(interval) == 0
