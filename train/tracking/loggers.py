"""Loggers: W&B (offline unless the user says otherwise) and a CSV log, named so that runs compare cleanly.

Runs of the same model and recipe share a W&B group; tags carry family, model, recipe and the distill/qat
switches, so the W&B table can be filtered and grouped by any of them.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from train.tracking.axes import EPOCH, IMAGES_SEEN

log = logging.getLogger(__name__)

AXES = ("step", EPOCH, IMAGES_SEEN)  # in every row: they say where a row is, not what it logged


class AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, made to continue the metrics.csv of a run it resumes (same run directory) instead of
    deleting it, so that each row appears once; columns of both segments are kept.

    Kept from the interrupted segment: its rows before `resume_step` (the global step training resumes from,
    set at train start by `ContinueLogs`), except a row whose values the resumed run logs again at the same step
    (the epoch-end row of an epoch whose last batch was checkpointed after its validation). Rows from the resume
    step on are dropped: the resumed run trains and logs those steps again. Without `resume_step`, the first step
    the resumed run logs stands in for it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.resume_step: int | None = None
        self._previous: list[dict[str, str]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Nothing to check: an existing log is continued (Lightning's writer deletes it here)."""

    def save(self) -> None:
        if self._previous is not None and (self.metrics or self.resume_step is not None):
            again: dict[int, set[str]] = {}  # step -> values the resumed run has logged at it (axes aside)
            for m in self.metrics:
                again.setdefault(int(m["step"]), set()).update(k for k in m if k not in AXES)
            resume = self.resume_step if self.resume_step is not None else min(again)

            def kept(row: dict[str, str]) -> bool:
                if not row.get("step"):
                    return False
                step = int(float(row["step"]))
                if step >= resume:
                    return False
                logged = {k for k, v in row.items() if v not in ("", None) and k not in AXES}
                return not logged & again.get(step, set())

            kept_rows = [row for row in self._previous if kept(row)]
            self._record_new_keys()
            tmp = f"{self.metrics_file_path}.tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept_rows)
            os.replace(tmp, self.metrics_file_path)
            self._previous = None
        super().save()


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose writer continues an existing log (see `AppendingCSVWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


class ContinueLogs(Callback):
    """Tells the CSV log which global step training resumes from (0 for a fresh start), once Lightning has restored
    it: the interrupted segment's rows from that step on are replaced by the resumed run's."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger) and rank_zero_only.rank == 0:
                logger.experiment.resume_step = trainer.global_step


class ServiceSafeWandbLogger(WandbLogger):
    """Lightning's WandbLogger, made to outlive W&B's service process. Slurm signals every process of a job step,
    and W&B's service (wandb-core) exits on SIGTERM whatever signal mask or disposition it inherits; the run's next
    W&B call then raises a connection error, from whatever logging step it is in, before the run reaches the safe
    step where it checkpoints and stops (`train.cluster.requeue`). Here the run carries on: the first such error is
    a warning, and every later W&B call of this segment is dropped (the CSV log and the checkpoint keep everything;
    the W&B rows of a SIGTERM-ed segment are lost either way)."""

    lost = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Lightning passes `anonymous=None` to wandb.init, which W&B 0.19+ answers with a deprecation warning.
        self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        wandb_call(self, lambda: super(ServiceSafeWandbLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params: Any) -> None:
        wandb_call(self, lambda: super(ServiceSafeWandbLogger, self).log_hyperparams(params))


def wandb_call(logger: Logger, call: Callable[[], Any]) -> Any:
    """`call()` on a W&B logger, unless its service is gone (see `ServiceSafeWandbLogger`): then nothing."""
    if getattr(logger, "lost", False):
        return None
    try:
        return call()
    except (ConnectionError, BrokenPipeError) as e:
        logger.lost = True
        log.warning("W&B: its service process is gone (%s: %s; a job's SIGTERM stops it): this segment's W&B calls "
                    "are dropped from here; the CSV log and the checkpoints are complete", type(e).__name__, e)
        return None


@dataclass(frozen=True)
class RunIdentity:
    model_key: str
    family: str
    recipe: str
    distill: bool
    qat: bool
    seed: int

    @property
    def variant(self) -> str:
        return "-".join([self.recipe] + (["kd"] if self.distill else []) + (["qat"] if self.qat else []))

    @property
    def group(self) -> str:
        return f"{self.model_key}/{self.variant}"

    @property
    def name(self) -> str:
        return f"{self.model_key}-{self.variant}-s{self.seed}"

    @property
    def tags(self) -> list[str]:
        return [f"family:{self.family}", f"model:{self.model_key}", f"recipe:{self.recipe}",
                f"distill:{str(self.distill).lower()}", f"qat:{str(self.qat).lower()}"]


def build_loggers(
    run_dir: Path, identity: RunIdentity, *, wandb_enabled: bool, project: str, entity: str | None, mode: str,
    csv: bool, config: dict[str, Any],
) -> list[Logger]:
    loggers: list[Logger] = []
    if wandb_enabled:
        # wandb reads WANDB_MODE itself; setting it keeps the service process and `wandb.init` in agreement.
        os.environ["WANDB_MODE"] = mode
        # One W&B run per run directory: a restart (requeue, ckpt_path=last) continues the same run id, and its
        # curves continue on trainer/global_step (WandbLogger's step metric), which the checkpoint restores.
        logger = ServiceSafeWandbLogger(
            project=project, entity=entity, name=identity.name, group=identity.group, tags=identity.tags,
            save_dir=str(run_dir), job_type="train", config=config, id=wandb_run_id(run_dir),
            # Offline, W&B keeps the id and ignores `resume` (`wandb sync` appends to the run), and wandb < 0.31 says
            # so on stderr at every start: ask for it only where it acts.
            resume="allow" if mode != "offline" else None,
            # W&B's banner and run summary: the run's final line says where its data is (offline, W&B says nothing
            # else a person needs; online, its warnings stay).
            settings={"silent": True} if mode == "offline" else {"quiet": True},
        )
        loggers.append(logger)
    if csv:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="csv", version=""))
    return loggers


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: made on its first start and kept in `<run_dir>/wandb_run_id` (written
    atomically, so ranks starting together agree on whichever landed first)."""
    path = Path(run_dir) / "wandb_run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".wandb_run_id.{os.getpid()}")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


@rank_zero_only
def record_summary(loggers: Sequence[Logger], values: dict[str, Any]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            wandb_call(logger, lambda logger=logger: logger.experiment.summary.update(values))


def close_loggers(loggers: Sequence[Logger], *, success: bool, preempted: bool = False) -> None:
    """Flush every logger and close the W&B run (Lightning's WandbLogger.finalize leaves it open until the process
    exits, and a run left open is reused by the next WandbLogger of the process). `preempted`: W&B marks the run
    preempting (it resumes under the same id)."""
    for logger in loggers:
        wandb_call(logger, lambda logger=logger: logger.finalize("success" if success else "failed"))
        if isinstance(logger, WandbLogger) and logger._experiment is not None and rank_zero_only.rank == 0:
            if preempted:
                wandb_call(logger, logger.experiment.mark_preempting)
            wandb_call(logger, lambda logger=logger: logger.experiment.finish(exit_code=0 if success else 1))
            logger._experiment = None  # a later use starts (resumes) the run again instead of logging to a closed one


def wandb_location(loggers: Sequence[Logger]) -> str | None:
    """Where the run's W&B data is: its URL online; offline, the directory and the command that uploads it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not getattr(logger, "lost", False):
            try:
                run = logger.experiment
                if os.environ.get("WANDB_MODE") == "offline":
                    return f"W&B offline: wandb sync {Path(run.dir).parent}"
                return f"W&B {run.url}"
            except Exception:  # a W&B that cannot say where it is must not fail a finished run
                return None
    return None
