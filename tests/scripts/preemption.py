"""A simulated preemption for resume tests: the run dies after a given optimizer step, as on a node failure."""

from __future__ import annotations

from lightning import Callback


class Preemption(Exception):
    pass


class PreemptAt(Callback):
    """Kills the run after `step` optimizer steps, as a node failure would (the checkpoint of that step may or
    may not have been written: the resume must work from whatever last.ckpt holds)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Preemption(f"preempted at step {trainer.global_step}")
