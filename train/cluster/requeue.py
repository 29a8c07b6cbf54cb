"""Preemption and time limits: a signal becomes a checkpoint at the next safe point, a closed log, and a requeue.

Slurm sends a signal ahead of a job's time limit (`--signal=USR1@T`; submitit and so the Hydra SLURM launcher send
USR2) or on preemption; `scancel --signal=USR1 JOB` sends one by hand. The handler only records it. At the next
point where every rank can stop together (the end of a training batch that no validation follows, or the end of
a validation), the ranks agree (a sum over ranks: one rank signalled is enough), then:
  1. `checkpoints/last.ckpt` is written atomically, with everything a resumed run needs (weights, optimizer,
     scheduler, EMA, data position, every rank's RNG states, best metrics, bad-sample counters);
  2. the loggers get the batch's row and are flushed, and the W&B run is marked preempting and finished: a
     requeue's SIGTERM would otherwise kill W&B's service with everything logged in this segment
     (seen with wandb 0.31 offline under Slurm 22.05: that segment's .wandb file kept only its 7-byte header);
  3. under Slurm the job is requeued, keeping its id, so the next start finds the same run directory and resumes
     from `last.ckpt` by itself (`ckpt_path=auto`). If a launcher owned the signal before the run (submitit, under
     the Hydra SLURM launcher), its own handler does the requeue (it also resubmits its pickled job and exits);
     otherwise rank 0 runs `scontrol requeue`;
  4. the run stops with `Requeued` (`python -m train` exits 0 with one line saying so).

Stop signals (SIGTERM: `scancel JOB`, `kill PID`, preemption without a warning signal) take steps 1 and 2 and stop
with `Stopped`, without a requeue: `ckpt_path=auto` in the same run dir resumes by hand. Slurm SIGKILLs a job
`KillWait` seconds (default 30) after its SIGTERM; if the next safe point is further away, the periodic
`last.ckpt` (`callbacks.checkpoint.every_n_train_steps`) is what survives.

Outside `fit`, from the start of `train()` to its end, `SignalGuard` holds the same signals and acts at once (there
is no step to reach): during start-up (data, online D3 scoring, DDP set-up) a requeue signal requeues the job as it
is, and during the export (published atomically) it requeues the job, whose resumed start exports again.

Slurm signals every process of a job step, loader workers included: they ignore these signals
(`data_pipes.stream.loader.init_loader_worker`), so they are still there when the trainer reaches its checkpoint.

Lightning's own SLURM auto-requeue is switched off (it saves from inside the signal handler, mid-step, on each rank
separately, into `hpc_ckpt_*.ckpt`); `ckpt_path=auto` still resumes from such a file if it is the newest.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from data_pipes.launch import this_process
from train.callbacks import validation_follows
from train.tracking.loggers import close_loggers

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The run stopped on a signal after checkpointing; `signum` is the signal."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


class Requeued(Stopped):
    """The run stopped on a requeue signal after checkpointing (and, under Slurm, its job was requeued)."""


class SignalGuard:
    """The job's signals for the whole process, from the start of `train()` to its end.

    Inside `fit`, `RequeueOnSignal` takes them over: it records a signal and stops every rank at the next safe step
    with a checkpoint. Outside it there is no step to wait for, so the guard acts at once: during start-up (reading
    the data, online D3 scoring, building the network, DDP set-up) nothing is lost by stopping, and during the export
    (written atomically: nothing half-written stays) the resumed job exports again from the final checkpoint. A
    requeue signal requeues the job as it is (through the launcher's own handler when one was installed before the
    run, submitit's under the Hydra SLURM launcher; else `scontrol requeue` from rank 0) and raises `Requeued`; a
    stop signal raises `Stopped`."""

    def __init__(self, *, signals: Sequence[str], stop_signals: Sequence[str], requeue: bool) -> None:
        self.signals = [_signal(name) for name in signals]
        self.stop_signals = [_signal(name) for name in stop_signals]
        if overlap := set(self.signals) & set(self.stop_signals):
            raise ValueError(f"callbacks.requeue: {sorted(signal.Signals(s).name for s in overlap)} is in both "
                             f"`signals` (checkpoint and requeue) and `stop_signals` (checkpoint and stop): keep one")
        self.requeue = requeue
        self.phase = "start-up"
        self.launchers: dict[int, Any] = {}  # the handlers before ours: a launcher's (submitit's) requeue
        self._installed = False

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in [*self.signals, *self.stop_signals]:
                self.launchers[sig] = signal.signal(sig, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            for sig, previous in self.launchers.items():
                if sig != signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:  # a stop already ignores it
                    signal.signal(sig, previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum in self.stop_signals:
            raise Stopped(f"stopped on {name} during {self.phase} (no training step since the last checkpoint: "
                          f"resume with ckpt_path=auto in this run dir)", signum)
        requeue_job(signum, self.launchers.get(signum), requeue=self.requeue, rank_zero=this_process().rank == 0)
        raise Requeued(f"{name} during {self.phase}: requeued; the resumed job starts from its last checkpoint",
                       signum)


def requeue_job(signum: int, launcher: Any, *, requeue: bool, rank_zero: bool, resumes_from: str = "") -> None:
    """Requeue the job: by the launcher's own handler when there is one (submitit's: rank 0 pickles the job's
    resubmission, runs `scontrol requeue` and exits, so a sweep waits for the requeued job instead of reading this
    segment as its result; other ranks return), else by `scontrol requeue` from rank 0 under Slurm."""
    if not requeue:
        return
    name = signal.Signals(signum).name
    if callable(launcher):
        log.info("handing %s to the launcher's handler (%s) to requeue", name,
                 getattr(launcher, "__qualname__", launcher))
        launcher(signum, None)
    elif rank_zero and (job := _slurm_job()):
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode:
            log.error("scontrol requeue %s failed (%s): resume by hand with ckpt_path=auto in the same run dir",
                      job, done.stderr.strip())
        else:
            log.info("requeued Slurm job %s%s", job, f": it resumes from {resumes_from}" if resumes_from else "")


class RequeueOnSignal(Callback):
    """Stops every rank together at a safe step after a signal (see the module). Ranks agree on whether any of them
    got one with an all-reduce, a host sync: a multi-process run does it every `check_every_n_steps` optimizer
    steps (the same steps on every rank, so they stop on the same step) and after every validation; a single
    process reads its own flag every step, which costs nothing."""

    def __init__(self, checkpoint: Path, *, guard: SignalGuard, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.requeue.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.checkpoint = Path(checkpoint)
        self.every = int(check_every_n_steps)
        self._checked_step = -1
        self.guard = guard
        self.signals, self.stop_signals = guard.signals, guard.stop_signals
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------------ signals

    def _install(self) -> None:
        # At train start: after Lightning's signal connector took its snapshot of the handlers (its teardown puts
        # that snapshot back, so ours must not be in it).
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. not in a notebook worker)
        for sig in [*self.signals, *self.stop_signals]:
            self._previous.setdefault(sig, signal.signal(sig, self._record))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning skips teardown when the run raises (Requeued included)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _ignore_sigterm(self) -> None:
        # Everything is saved. The SIGTERM of a requeue (or of the scancel being answered) reaches every rank in a
        # moment: let the ranks tear down and exit, rather than Lightning's SIGTERM handler (which _restore would
        # put back) starting a broadcast with ranks that are already gone. Lightning's teardown restores the
        # process's original handler afterwards.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._previous.pop(signal.SIGTERM, None)

    def _record(self, signum: int, frame: Any) -> None:
        # Nothing else here: the training step is somewhere in the middle. A requeue signal wins over a stop signal
        # (a requeue's own SIGTERM can arrive before the stop it asked for).
        if self._received is None or signum in self.signals:
            self._received = signum

    # ------------------------------------------------------------------------------------------------ stopping

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()
        if trainer.ckpt_path and trainer.is_global_zero:
            log.info("resumed from %s at step %d (epoch %d)", trainer.ckpt_path, trainer.global_step,
                     trainer.current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # After a batch that a validation follows, the checkpoint waits for that validation (see StepCheckpoint).
        if not validation_follows(trainer, batch_idx):
            self._stop_if_signalled(trainer, pl_module, log_this_batch=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop_if_signalled(trainer, pl_module, log_this_batch=False, always=True)

    def signalled(self, trainer: Trainer, device: torch.device, *, always: bool = False) -> tuple[int, int] | None:
        """(ranks that got a requeue signal, ranks that got a stop signal) when this step is one where the ranks
        agree (every step alone; every `every` optimizer steps, once each, or `always`, with others); else None."""
        mine = [int(self._received in self.signals), int(self._received in self.stop_signals)]
        if trainer.world_size == 1:
            return mine[0], mine[1]
        step = trainer.global_step
        if not always and (step % self.every or step == self._checked_step):
            return None
        self._checked_step = step
        counts = trainer.strategy.reduce(torch.tensor(mine, dtype=torch.int64, device=device), reduce_op="sum")
        return tuple(int(n) for n in counts.tolist())

    def _stop_if_signalled(self, trainer: Trainer, pl_module: LightningModule, *, log_this_batch: bool,
                           always: bool = False) -> None:
        # One requeue request outweighs any stops.
        counts = self.signalled(trainer, pl_module.device, always=always)
        if counts is None or sum(counts) == 0:
            return
        requeues, stops = counts
        requeue = requeues > 0
        name = signal.Signals(self._received).name if self._received is not None else "a signal on another rank"
        trainer.save_checkpoint(self.checkpoint)  # every rank: each adds its RNG states; rank 0 writes
        if trainer.is_global_zero:
            log.info("%s: checkpoint %s at step %d (epoch %d)", name, self.checkpoint, trainer.global_step,
                     trainer.current_epoch)
        if log_this_batch:
            # Lightning sends a batch's metrics to the loggers after on_train_batch_end; stopping here would lose
            # that row (the resumed run starts at the next batch), so send it as the loop would have.
            trainer._logger_connector.update_train_step_metrics()
        close_loggers(trainer.loggers, success=True, preempted=True)
        self._ignore_sigterm()
        message = f"stopped on {name} at step {trainer.global_step}; checkpoint {self.checkpoint}"
        if not requeue:
            raise Stopped(f"{message} (not requeued: resume with ckpt_path=auto in this run dir)", self._received)
        self._restore()  # the guard's handlers: no second stop while the launcher's handler runs
        launcher = self.guard.launchers.get(self._received) if self._received in self.signals else None
        requeue_job(self._received or self.signals[0], launcher, requeue=self.guard.requeue,
                    rank_zero=trainer.is_global_zero, resumes_from=str(self.checkpoint))
        raise Requeued(message, self._received)


def _signal(name: str) -> int:
    try:
        return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))
    except AttributeError:
        raise ValueError(f"callbacks.requeue: {name!r} is not a signal (e.g. SIGUSR1, SIGUSR2, SIGTERM)") from None


def _slurm_job() -> str | None:
    """The job id `scontrol requeue` takes (an array task's own id)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")
