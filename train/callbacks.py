"""Callbacks and checkpoint I/O: what every run gets besides the module and the data."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
    WeightAveraging,
)
from torch import Tensor

from train.axes import ComparableAxes
from train.throughput import ThroughputLogger
from train.tracking import ContinueLogs

log = logging.getLogger(__name__)


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

    def __init__(self, run_config: dict[str, Any], dataset: dict[str, Any], data_config: dict[str, Any],
                 provenance: dict[str, Any] | None = None) -> None:
        self.record = {"run_config": run_config, "dataset": dataset, "data_config": data_config,
                       "provenance": provenance or {}}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.record)


class RngStates(Callback):
    """Every rank's global RNG states (torch, CUDA, numpy, Python) in each checkpoint, put back at the first training
    batch after a resume: dropout, drop-path and Mixup/CutMix then draw what the uninterrupted run drew.

    Put back at the first batch rather than at load, because in between the resumed run builds its loaders and
    runs the sanity check, which the run it continues did not do at that point. (Loaders draw their workers' base
    seed from their own generator, not from the global one: see `ShardLoader`. Augmentation is reseeded per batch
    in the workers.) States are plain tensors and numbers, so checkpoints still load with `weights_only=True`."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook for every save (Lightning writes the file on rank 0), so the gather is safe.
        mine = _rng_states()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        if len(states) != trainer.world_size:
            if trainer.is_global_zero:
                log.warning("resume: the checkpoint holds the RNG states of %d ranks, this run has %d: random draws "
                            "(dropout, drop-path, mixup) will not repeat the interrupted run's", len(states),
                            trainer.world_size)
            return
        self._pending = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


def _rng_states() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": [version, list(py_state), gauss]}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, py_state, gauss = states["python"]
    random.setstate((version, tuple(py_state), gauss))


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


def build_callbacks(
    run_dir: Path, *, every_n_train_steps: int, save_top_k: int, lr_monitor: bool, ema_decay: float | None,
    ema_warmup: bool, record: RunRecord, has_logger: bool, progress_refresh: int | None,
) -> list[Callback]:
    checkpoints = run_dir / "checkpoints"
    # StepCheckpoint alone writes last.ckpt (every N steps and after each validation), so `ckpt_path=last` always
    # finds the newest state under one name.
    callbacks: list[Callback] = [
        ComparableAxes(),  # before anything that sends a row (RequeueOnSignal's last one included)
        ContinueLogs(),
        StepCheckpoint(dirpath=checkpoints, filename="step-{step}", every_n_train_steps=every_n_train_steps,
                        save_last=True, save_top_k=0, enable_version_counter=False),
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/acc1", mode="max", save_top_k=save_top_k,
                        save_last=False, auto_insert_metric_name=False, enable_version_counter=False),
        record,
        RngStates(),
    ]
    if progress_refresh:
        # Refreshing reads the loss from the device: once per logging interval, not every step. Without a terminal
        # (a Slurm job, a log file) progress is plain lines instead of a carriage-return bar.
        callbacks.append(TQDMProgressBar(refresh_rate=progress_refresh) if sys.stdout.isatty()
                         else PlainProgress(progress_refresh))
    if has_logger:
        callbacks.append(ThroughputLogger(batch_size_fn=image_count))
        if lr_monitor:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    if ema_decay is not None:
        # Validation and checkpoints use the averaged weights; at the end they replace the trained ones (export).
        callbacks.append(EMAWeights(avg_fn=WarmupEMA(ema_decay, ema_warmup), use_buffers=True))
    return callbacks
