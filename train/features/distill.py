"""`distill=true`: learn from a teacher (the `kd` group; the MobileNetV4 recipe by default, `kd=logit` classic KD).

It contributes the recipe's regularisation (dropout on the classifier only), the teacher-labelled data with its
objective and validation beside the teacher (`distill.recipe`), the student's batch mixing (none for the recipe, whose
views are already mixed where it mixes), the teacher and kd sets as the run's record and W&B inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from data_pipes.errors import Problems
from data_pipes.shards.metadata import DatasetInfo
from distill.reader import adopt_recorded
from distill.recipe import Distillation, build_distillation, check_inputs
from distill.teacher import Teacher
from train.features.base import DataParts, Feature
from train.nets.configs import command_line_keys, plain
from train.objective import NoMixing
from train.tracking.lineage import use_inputs

log = logging.getLogger(__name__)


class KnowledgeDistillation(Feature):
    def __init__(self, kd: Mapping[str, Any], *, train_aug: Mapping[str, Any], label_smoothing: float,
                 train_dct_reduce: bool, eval_dct_reduce: bool, selection_dir: Path,
                 conflicts: Sequence[str] = (), compile_mode: str | None = None) -> None:
        self.kd = dict(kd)
        self.conflicts = list(conflicts)  # explicit settings that the built kd sets refuse (the preflight says so)
        self.train_aug, self.label_smoothing = dict(train_aug), label_smoothing
        self.train_dct_reduce, self.eval_dct_reduce = train_dct_reduce, eval_dct_reduce
        self.selection_dir = selection_dir
        self.built: Distillation | None = None
        self.teacher: Teacher | None = None  # the preflight's, when it ran
        self.compile_mode = compile_mode  # compile=true: the teacher runs compiled too (torch.compile's mode)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> KnowledgeDistillation:
        # Built kd sets record the settings they were built with: take those the command did not set.
        kd, taken, conflicts = adopt_recorded(plain(cfg.kd), command_line_keys())
        if taken:
            log.info("kd.sets=%s was built with %s: taken from it", kd["sets"],
                     ", ".join(f"{k}={v}" for k, v in taken.items()))
        if kd["teacher"] is None and cfg.qat and cfg.init_from:
            # qat=true distill=true: the float model QAT starts from is the natural teacher of its fake-quant copy.
            kd["teacher"] = str(cfg.init_from)
            log.info("kd.teacher: the float model of init_from=%s", cfg.init_from)
        return cls(kd, train_aug=plain(cfg.aug.train), label_smoothing=float(cfg.label_smoothing),
                   train_dct_reduce=bool(cfg.data.train_dct_reduce), eval_dct_reduce=bool(cfg.data.eval_dct_reduce),
                   selection_dir=Path(str(cfg.run_dir)) / "kd_selection", conflicts=conflicts,
                   compile_mode=str(cfg.compile_mode) if cfg.compile else None)

    def preflight(self, problems: Problems, *, info: DatasetInfo | None, trainer: Mapping[str, Any]) -> None:
        for conflict in self.conflicts:
            problems.add(conflict)
        self.teacher = check_inputs(self.kd, info, problems)  # loaded once: `data` builds with it

    def regularisation(self, rates: dict[str, float | None]) -> dict[str, float | None]:
        # The recipe's own dropout and stochastic depth (kd.drop_rate, kd.drop_path_rate), where it sets them.
        return {k: self.kd[k] if self.kd.get(k) is not None else v for k, v in rates.items()}

    def data(self, parts: DataParts, *, info: DatasetInfo, data_config: Mapping[str, Any]) -> DataParts:
        self.built = kd = build_distillation(
            self.kd, info, data_config, parts.datamodule_args, train_aug=self.train_aug,
            label_smoothing=self.label_smoothing, train_dct_reduce=self.train_dct_reduce,
            eval_dct_reduce=self.eval_dct_reduce, selection_dir=self.selection_dir, teacher=self.teacher)
        if self.compile_mode is not None:  # online labels and validation beside the teacher: its forward, compiled
            kd.teacher.compile(self.compile_mode)
        # The recipe's views are already mixed where the recipe mixes (D2): the student only flips.
        mixing = NoMixing() if self.kd["method"] == "soft_target" else parts.batch_mixing
        return replace(parts, datamodule=kd.datamodule, objective=kd.objective, val_extras=kd.val_extras,
                       batch_mixing=mixing)

    def record(self) -> dict[str, Any]:
        return {"kd": self.built.record} if self.built is not None else {}

    def declare_inputs(self, loggers: Sequence[Logger]) -> None:
        if self.built is not None:
            use_inputs(loggers, teacher=self.built.record["teacher"], kd_sets=self.kd["sets"],
                       kd_identity=self.built.record.get("sets"))
