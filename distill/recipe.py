"""`distill=true`: the teacher, the data, the objective and the validation metrics of a distillation run, built from
the composed config (`kd` group) for `train.run.train`; `distill.build` uses the same source definitions."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data_pipes.image.augment import build_eval_transform, build_train_transform
from data_pipes.image.decode import resize
from data_pipes.image.views import ViewRecipe
from data_pipes.shards.metadata import DatasetError, DatasetInfo, read_info
from data_pipes.stream.datamodule import MixtureDataModule, ShardDataModule
from data_pipes.stream.mixture import MixtureStream, SourceReader, source_blocks
from distill.kdset import KDSetError
from distill.objectives import LogitDistillation, SoftTargetDistillation
from distill.teacher import Teacher, TeacherError, load_teacher
from distill.validation import TeacherValidation, WithTeacherView

log = logging.getLogger(__name__)
SOURCE_NAMES = ("d1", "d2", "d3")
METHODS = ("soft_target", "logit")


@dataclass(frozen=True)
class SourceConfig:
    """One kd source as configured (`kd.sources.<name>`), resolved against its shards."""

    name: str
    index: int
    root: Path
    info: DatasetInfo
    recipe: ViewRecipe
    replicas: int
    weight: float
    labelled: bool
    extra: dict[str, Any] = field(default_factory=dict)
    # D3: the selected members (indices into the train split, sorted, repeated for rare classes); None: every image
    members: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def shards(self) -> list[tuple[Path, int]]:
        return self.info.shards("train")

    @property
    def blocks(self) -> list[tuple[str, np.ndarray]]:
        return source_blocks(self.shards, self.members)

    @property
    def selected(self) -> bool:
        """Whether the source is a selection of its images (D3) rather than all of them."""
        return self.name == "d3"


@dataclass
class Distillation:
    teacher: Teacher
    datamodule: ShardDataModule
    objective: nn.Module
    val_extras: nn.Module
    record: dict[str, Any]  # what the run logs about its teacher and kd sets


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_teacher(kd: Mapping[str, Any], info: DatasetInfo) -> Teacher:
    teacher = load_teacher(kd["teacher"], weights=kd["teacher_weights"], labels=kd["teacher_labels"],
                           num_classes=info.num_classes)
    teacher.check_classes(tuple(info.label_names), f"the data at {info.root}")
    if kd["teacher_img_size"]:
        teacher.data_config["input_size"] = [3, int(kd["teacher_img_size"]), int(kd["teacher_img_size"])]
    return teacher


def view_size(kd: Mapping[str, Any], student_size: int, teacher: Teacher) -> int:
    return int(kd["view_size"] or max(student_size, teacher.img_size))


def source_configs(kd: Mapping[str, Any], size: int) -> list[SourceConfig]:
    """The sources in use: D1 and D2 on the labelled data, D3 when `kd.extra_root` is set; a weight of 0 drops one."""
    out = []
    for index, name in enumerate(SOURCE_NAMES):
        cfg = dict(kd["sources"][name])
        if not cfg.get("root") or float(cfg["weight"]) <= 0:
            continue
        root = Path(str(cfg["root"])).expanduser()
        try:
            info = read_info(root)
        except DatasetError as e:
            raise KDSetError(f"kd source {name} (kd.sources.{name}.root={root}): {e}") from None
        if "train" not in info.splits or info.split("train").num_samples == 0:
            raise KDSetError(f"kd source {name} at {root} has no train samples: point kd.sources.{name}.root (or "
                             f"kd.extra_root for d3) at a shard directory with a train split")
        recipe = ViewRecipe.from_config(size, cfg["aug"], jpeg_quality=kd["jpeg_quality"],
                                        mixup_fold=bool(kd["mixup_fold"]))
        extra = {k: v for k, v in cfg.items() if k not in ("root", "aug", "replicas", "weight", "labelled")}
        out.append(SourceConfig(name, index, root, info, recipe, int(cfg["replicas"]), float(cfg["weight"]),
                                bool(cfg["labelled"]), extra))
    if not out:
        raise KDSetError("no kd source is in use: give kd.sources.d1/d2 a root (data.root) and a positive weight")
    return out


def build_distillation(cfg: DictConfig, info: DatasetInfo, data_config: dict[str, Any],
                       datamodule_args: dict[str, Any]) -> Distillation:
    """Everything `distill=true` adds to a run. `datamodule_args` are the labels-only datamodule's arguments."""
    kd = plain(cfg.kd)
    if kd["teacher"] is None and cfg.qat and cfg.init_from:
        # qat=true distill=true: the float model QAT starts from is the natural teacher of its fake-quant copy.
        kd["teacher"] = str(cfg.init_from)
        log.info("kd.teacher: the float model of init_from=%s", cfg.init_from)
    if kd["method"] not in METHODS:
        raise KDSetError(f"kd.method must be one of {METHODS}, got {kd['method']!r}")
    teacher = build_teacher(kd, info)
    size = int(data_config["input_size"][-1])
    teacher_eval = build_eval_transform(teacher.img_size, crop_pct=teacher.data_config["crop_pct"],
                                        interpolation=teacher.interpolation, dct_reduce=cfg.data.eval_dct_reduce)
    args = dict(datamodule_args, eval_transform=WithTeacherView(datamodule_args["eval_transform"], teacher_eval))
    record: dict[str, Any] = {"teacher": teacher.identity, "method": kd["method"]}
    if kd["method"] == "logit":
        aug = plain(cfg.aug.train)
        views = build_train_transform(max(size, teacher.img_size), **aug, dct_reduce=cfg.data.train_dct_reduce)
        args["train_transform"] = TwoSizes(views, size, aug["interpolation"], teacher.img_size, teacher.interpolation)
        objective = LogitDistillation(teacher=teacher, temperature=float(kd["temperature"]),
                                      task_weight=float(kd["task_weight"]),
                                      distill_weight=float(kd["distill_weight"]),
                                      label_smoothing=float(cfg.label_smoothing), student_mean=data_config["mean"],
                                      student_std=data_config["std"])
        return Distillation(teacher, ShardDataModule(**args), objective, TeacherValidation(teacher), record)

    sources = source_configs(kd, view_size(kd, size, teacher))
    kd_sets = _open_sets(kd, sources, teacher, info)
    sources = kd_sets.resolve(sources) if kd_sets is not None else _select_online(cfg, kd, sources, teacher, info)
    record["sets"] = None if kd_sets is None else kd_sets.identity
    record["sources"] = {s.name: {"weight": s.weight, "replicas": s.replicas, "root": str(s.root)} for s in sources}
    factory = StreamFactory(sources=sources, kd=kd, seed=int(kd["seed"]), batch_size=int(cfg.data.batch_size),
                            shuffle_window=int(cfg.data.shuffle_window), student_size=size,
                            student_interpolation=str(cfg.aug.train.interpolation), teacher=teacher, kd_sets=kd_sets)
    datamodule = MixtureDataModule(make_stream=factory, epoch_samples=kd["epoch_samples"], **args)
    objective = SoftTargetDistillation(num_classes=info.num_classes, temperature=float(kd["temperature"]),
                                       missing_mass=str(kd["missing_mass"]),
                                       source_names=[s.name for s in sources],
                                       teacher=teacher if kd_sets is None else None)
    return Distillation(teacher, datamodule, objective, TeacherValidation(teacher), record)


def _open_sets(kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher, info: DatasetInfo):
    if not kd["sets"]:
        return None
    from distill.build import KDSets

    return KDSets.open(Path(str(kd["sets"])), kd=kd, sources=sources, teacher=teacher, label_names=info.label_names)


def _select_online(cfg: DictConfig, kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher,
                   info: DatasetInfo) -> list[SourceConfig]:
    """Online D3: score and balance the extra images before training (kept in kd.selection, by default in the run
    directory, so a resumed run reuses it; every rank computes the same selection)."""
    d3 = next((s for s in sources if s.selected), None)
    if d3 is None:
        return sources
    from distill.build import build_selector, score_args, selection_identity
    from distill.select import score, select, with_selection

    directory = Path(str(kd["selection"] or Path(str(cfg.run_dir)) / "kd_selection")).expanduser()
    settings = selection_identity(kd) | {"extra_root": str(d3.root)}
    _check_selection(directory, settings)
    score(build_selector(kd, info, teacher), d3.shards, directory, share=(0, 1), **score_args(kd))
    selection = select(directory, d3.shards, label_names=info.label_names, threshold=settings["threshold"],
                       per_class=settings["per_class"], identity=settings)
    return [with_selection(s, selection) if s.selected else s for s in sources]


def _check_selection(directory: Path, settings: dict[str, Any]) -> None:
    from distill.kdset import read_json

    counts = directory / "class_counts.json"
    if counts.is_file():
        made = {k: read_json(counts).get(k) for k in settings}
        if made != settings:
            raise KDSetError(f"the D3 selection in {directory} was made with {made}, not the configured {settings}: "
                             f"point kd.selection at another directory, or delete this one")


@dataclass(frozen=True)
class StreamFactory:
    """Makes each rank's `MixtureStream` (picklable: it is called in the trainer's process, after setup)."""

    sources: list[SourceConfig]
    kd: dict[str, Any]
    seed: int
    batch_size: int
    shuffle_window: int
    student_size: int
    student_interpolation: str
    teacher: Teacher
    kd_sets: Any

    def __call__(self, rank: int, world_size: int, batches_per_epoch: int) -> MixtureStream:
        from distill.views import OnlineViews, StoredViews

        views = []
        for s in self.sources:
            if self.kd_sets is None:
                reader = SourceReader(s.blocks)
                views.append(OnlineViews(s.recipe, reader, source=s.index, seed=self.seed, labelled=s.labelled))
            else:
                reader = SourceReader(s.blocks)
                views.append(StoredViews(s.recipe, reader, directory=self.kd_sets.root / s.name,
                                         replicas=s.replicas, storage=self.kd_sets.storage, labelled=s.labelled))
        online = self.kd_sets is None
        return MixtureStream(
            views, names=[s.name for s in self.sources], weights=[s.weight for s in self.sources],
            batch_size=self.batch_size, batches_per_epoch=batches_per_epoch, seed=self.seed,
            shuffle_window=self.shuffle_window, rank=rank, world_size=world_size, student_size=self.student_size,
            student_interpolation=self.student_interpolation, hflip=float(self.kd["student_hflip"]),
            teacher_size=self.teacher.img_size if online else None, teacher_interpolation=self.teacher.interpolation,
            top_k=None if online else int(self.kd_sets.top_k))


class TwoSizes:
    """A train transform's view at two resolutions: the student's `image` and the teacher's `teacher_image`."""

    def __init__(self, transform, size: int, interpolation: str, teacher_size: int, teacher_interpolation: str):
        self.transform, self.size, self.interpolation = transform, size, interpolation
        self.teacher_size, self.teacher_interpolation = teacher_size, teacher_interpolation

    def __call__(self, data: bytes) -> dict:
        view = self.transform(data)
        return {"image": resize(view, self.size, self.size, self.interpolation),
                "teacher_image": resize(view, self.teacher_size, self.teacher_size, self.teacher_interpolation)}


__all__ = ["Distillation", "KDSetError", "SourceConfig", "TeacherError", "build_distillation", "build_teacher",
           "source_configs", "view_size"]
