"""The callbacks every run gets besides the module and the data, each module one concern:

    checkpoints  atomic checkpoint I/O, the step/validation checkpoint that writes last.ckpt, the export's record
    rng          every rank's RNG states, put back at the first batch after a resume
    ema          EMA of the weights with timm's warm-up (fake-quant safe)
    progress     plain progress lines when the output is not a terminal
    compile_watch  what torch.compile cost (the first step, said once) and any recompilation (compile=true's)

Loggers and what they log (axes, throughput, the summary row) are `train.tracking`; stopping on a signal is
`train.cluster.requeue`; an optional feature's own callbacks come from its component (`train.features`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import Callback
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from train.callbacks.checkpoints import AtomicCheckpointIO, RunRecord, StepCheckpoint, validation_follows
from train.callbacks.ema import EMAWeights, FusedEMA
from train.callbacks.progress import PlainProgress, image_count
from train.callbacks.rng import RankSeeds, RngStates
from train.tracking.axes import ComparableAxes
from train.tracking.loggers import ContinueLogs
from train.tracking.throughput import ThroughputLogger

__all__ = ["AtomicCheckpointIO", "EMAWeights", "PlainProgress", "RankSeeds", "RngStates", "RunRecord", "StepCheckpoint",
           "FusedEMA", "build_callbacks", "image_count", "validation_follows"]


def build_callbacks(
    run_dir: Path, *, every_n_train_steps: int, save_top_k: int, lr_monitor: bool, ema_decay: float | None,
    ema_warmup: bool, record: RunRecord, has_logger: bool, progress_refresh: int | None, seed: int,
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
        RankSeeds(seed),  # before RngStates: a resume's saved states win at the first batch
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
        callbacks.append(EMAWeights(decay=ema_decay, warmup=ema_warmup))
    return callbacks
