"""Loggers: W&B (offline unless the user says otherwise) and a CSV log, named so that runs compare cleanly.

Runs of the same model and recipe share a W&B group; tags carry family, model, recipe and the distill/qat
switches, so the W&B table can be filtered and grouped by any of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only


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
        logger = WandbLogger(
            project=project, entity=entity, name=identity.name, group=identity.group, tags=identity.tags,
            save_dir=str(run_dir), job_type="train", config=config,
        )
        loggers.append(logger)
    if csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    return loggers


@rank_zero_only  # other ranks hold a stand-in W&B run
def define_summaries(loggers: Sequence[Logger]) -> None:
    """The W&B summary of val/acc1 and val/acc5 is their best value, not the last one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key in ("val/acc1", "val/acc5"):
                logger.experiment.define_metric(key, summary="max")


@rank_zero_only
def record_summary(loggers: Sequence[Logger], values: dict[str, Any]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
