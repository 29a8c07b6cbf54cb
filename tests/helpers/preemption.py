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


class PreemptBeforeValidation(Callback):
    """Kills the run when its first validation starts: after the checkpoint of the epoch's last batch, before the
    epoch's validation and end-of-epoch checkpoint (a run resumed from there has finished its epoch's batches but
    not the epoch)."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            raise Preemption(f"preempted before validation at step {trainer.global_step}")


class SignalAt(Callback):
    """Sends the training process `signum` once, after `step` optimizer steps (as `scancel --signal=USR1` would)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            import os

            self.sent = True
            os.kill(os.getpid(), self.signum)
