"""What torch.compile cost a run and whether it kept its graphs: the first step's time, said once, and any
recompilation after the first steps, said with where to look.

A compiled network compiles at its first training step (the training graph, forward and backward) and at its first
validation batch (the eval graph: batch norm and dropout behave differently). The stream keeps every batch the same
shape (training drops the last partial batch, validation pads to whole batches), so after those two no graph should
be added; one that is costs a compile's time mid-run, every time the cause recurs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lightning import Callback, LightningModule, Trainer

from train.nets.compiled import compiled_graphs
from train.tracking.loggers import record_summary

log = logging.getLogger(__name__)


class CompileWatch(Callback):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.first_step_s: float | None = None
        self.first_val_batch_s: float | None = None
        self.settled: int | None = None  # graphs once the first training step and first validation batch ran
        self._start = 0.0
        self._before = 0  # graphs compiled in this process before this fit

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before = compiled_graphs()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_step_s is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self._start
            self.settled = compiled_graphs()
            if trainer.is_global_zero:
                new = self.settled - self._before
                log.info("torch.compile (mode %s): the first training step took %.1f s, compiling %d graph%s; the "
                         "steps after it run the compiled code", self.mode, self.first_step_s, new,
                         "" if new == 1 else "s")

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.first_val_batch_s is None:
            self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.first_val_batch_s is None:
            self.first_val_batch_s = time.perf_counter() - self._start
            self.settled = compiled_graphs()
            if trainer.is_global_zero:
                log.info("torch.compile: the first validation batch took %.1f s (compiling the eval graph)",
                         self.first_val_batch_s)

    def recompiles(self) -> int:
        """Graphs compiled after the first training step and the first validation batch."""
        return 0 if self.settled is None else compiled_graphs() - self.settled

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        late = self.recompiles()
        if late and trainer.is_global_zero:
            log.warning("torch.compile compiled %d more graph%s after the first steps (each a compile's time "
                        "mid-run): a batch shape or a guarded value changed; TORCH_LOGS=recompiles names the cause",
                        late, "" if late == 1 else "s")
        record_summary(trainer.loggers, {"compile/first_step_s": self.first_step_s,
                                         "compile/first_val_batch_s": self.first_val_batch_s,
                                         "compile/graphs": compiled_graphs() - self._before,
                                         "compile/recompiles": late})
