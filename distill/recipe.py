"""`distill=true`: the teacher, the data, the objective and the validation metrics of a distillation run, built from
the `kd` settings for the training run (`train.features.distill`); `distill.build` uses the same sources.

Two methods: `soft_target`, the MobileNetV4 recipe (Qin et al. 2024, arXiv 2404.10518, §8 and App. H: batches mixed
from the teacher-labelled sources D1/D2/D3, offline from built kd sets or online), and `logit`, classic online logit
KD on the run's own augmentation (timm's LogitDistillationTask).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from data_pipes.errors import Problems
from data_pipes.image.augment import build_eval_transform, build_train_transform
from data_pipes.image.decode import resize
from data_pipes.launch import work_share
from data_pipes.shards.metadata import DatasetInfo, read_info
from data_pipes.stream.datamodule import MixtureDataModule, ShardDataModule
from data_pipes.stream.mixture import MixtureStream, SourceReader
from distill.identity import selection_identity
from distill.kdset import BUILD_FILE, MANIFEST, KDSetError, read_json
from distill.objectives import LogitDistillation, SoftTargetDistillation
from distill.reader import KDSets
from distill.select import build_selector, score, score_args, wait_for_selection, with_selection
from distill.sources import SourceConfig, build_teacher, source_configs, view_size
from distill.teacher import Teacher, load_teacher, release
from distill.validation import TeacherValidation, WithTeacherView
from distill.views import OnlineViews, StoredViews

log = logging.getLogger(__name__)
METHODS = ("soft_target", "logit")


@dataclass
class Distillation:
    teacher: Teacher
    datamodule: ShardDataModule
    objective: nn.Module
    val_extras: nn.Module
    record: dict[str, Any]  # what the run logs about its teacher and kd sets


def build_distillation(kd: Mapping[str, Any], info: DatasetInfo, data_config: Mapping[str, Any],
                       datamodule_args: Mapping[str, Any], *, train_aug: Mapping[str, Any], label_smoothing: float,
                       train_dct_reduce: bool, eval_dct_reduce: bool, selection_dir: Path,
                       teacher: Teacher | None = None) -> Distillation:
    """Everything `distill=true` adds to a run. `kd`: the kd settings as plain values; `datamodule_args`: the
    labels-only datamodule's arguments (batch size, shuffle window, transforms, ...); `train_aug`: the run's
    aug.train (logit KD augments as the run does); `selection_dir`: where online D3 keeps its selection when
    kd.selection is not set; `teacher`: the one `check_inputs` loaded, if it ran (else loaded here)."""
    if kd["method"] not in METHODS:
        raise KDSetError(f"kd.method must be one of {METHODS}, got {kd['method']!r}")
    teacher = teacher or build_teacher(kd, info)
    size = int(data_config["input_size"][-1])
    teacher_eval = build_eval_transform(teacher.img_size, crop_pct=teacher.data_config["crop_pct"],
                                        interpolation=teacher.interpolation, dct_reduce=eval_dct_reduce)
    args = dict(datamodule_args, eval_transform=WithTeacherView(datamodule_args["eval_transform"], teacher_eval))
    record: dict[str, Any] = {"teacher": teacher.identity, "method": kd["method"]}
    if kd["method"] == "logit":
        views = build_train_transform(max(size, teacher.img_size), **train_aug, dct_reduce=train_dct_reduce)
        args["train_transform"] = TwoSizes(views, size, train_aug["interpolation"], teacher.img_size,
                                           teacher.interpolation)
        objective = LogitDistillation(teacher=teacher, temperature=float(kd["temperature"]),
                                      task_weight=float(kd["task_weight"]),
                                      distill_weight=float(kd["distill_weight"]),
                                      label_smoothing=float(label_smoothing), student_mean=data_config["mean"],
                                      student_std=data_config["std"])
        return Distillation(teacher, ShardDataModule(**args), objective, TeacherValidation(teacher), record)

    sources = source_configs(kd, view_size(kd, size, teacher))
    kd_sets = _open_sets(kd, sources, teacher, info)
    if kd_sets is not None:
        sources = kd_sets.resolve(sources)
    else:
        directory = Path(str(kd["selection"] or selection_dir)).expanduser()
        sources = _select_online(kd, sources, teacher, info, directory)
    record["sets"] = None if kd_sets is None else kd_sets.identity
    record["sources"] = {s.name: {"weight": s.weight, "replicas": s.replicas, "root": str(s.root)} for s in sources}
    factory = StreamFactory(sources=sources, kd=dict(kd), seed=int(kd["seed"]), batch_size=int(args["batch_size"]),
                            shuffle_window=int(args["shuffle_window"]), student_size=size,
                            student_interpolation=str(train_aug["interpolation"]), teacher=teacher, kd_sets=kd_sets)
    datamodule = MixtureDataModule(make_stream=factory, epoch_samples=kd["epoch_samples"], **args)
    objective = SoftTargetDistillation(num_classes=info.num_classes, temperature=float(kd["temperature"]),
                                       missing_mass=str(kd["missing_mass"]),
                                       source_names=[s.name for s in sources],
                                       teacher=teacher if kd_sets is None else None)
    return Distillation(teacher, datamodule, objective, TeacherValidation(teacher), record)


def check_inputs(kd: Mapping[str, Any], info: DatasetInfo | None, problems: Problems, *,
                 building: bool = False) -> Teacher | None:
    """The preflight of `distill=true` and of `distill.build` (nothing written): the method, the teacher (it loads
    and predicts the data's classes), the shards of every source in use, and (training, not `building`) that
    `kd.sets` holds built sets. Whether the sets fit this run is checked when they open (it needs the views'
    sizes), still before the run writes anything. Returns the teacher when it loaded and fits the data (the run
    uses it rather than loading it again)."""
    if kd["method"] not in METHODS:
        problems.add(f"kd.method={kd['method']!r} is not a method: choose one of {', '.join(METHODS)} (kd=mnv4 or "
                     f"kd=logit set it)")
    teacher = None
    with problems.collect():
        if info is not None:
            teacher = build_teacher(kd, info)
        else:
            load_teacher(kd["teacher"], weights=kd["teacher_weights"], labels=kd["teacher_labels"])
    if kd["method"] != "soft_target":
        return teacher
    for name, source in (kd.get("sources") or {}).items():
        root = (source or {}).get("root")
        weight = (source or {}).get("weight") or 0
        if root and weight > 0 and (info is None or Path(str(root)).expanduser().absolute() != Path(info.root)):
            setting = "kd.extra_root" if name == "d3" else f"kd.sources.{name}.root"  # D3's root is kd.extra_root
            with problems.collect():
                read_info(root, check_files=False, setting=setting)
    if kd.get("sets") and not building:
        root = Path(str(kd["sets"])).expanduser()
        if not (root / MANIFEST).is_file() and not (root / BUILD_FILE).is_file():
            problems.add(f"kd.sets={root} holds no built kd sets: build them with `python -m distill.build <the same "
                         f"overrides> kd.sets={root}`, or train online (the teacher labels each view) with "
                         f"kd.sets=null")
    return teacher


def _open_sets(kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher, info: DatasetInfo,
               ) -> KDSets | None:
    if not kd["sets"]:
        return None
    return KDSets.open(Path(str(kd["sets"])), kd=kd, sources=sources, teacher=teacher, label_names=info.label_names)


def _select_online(kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher, info: DatasetInfo,
                   directory: Path) -> list[SourceConfig]:
    """Online D3: score and balance the extra images before training, once per run: every process of the launch
    scores its own share of the extra shards on its own device, waits for the others' scores, and makes the same
    selection (kept in `directory`, by default in the run directory, so a resumed run reuses it). The selector's
    device memory is given back before training."""
    d3 = next((s for s in sources if s.selected), None)
    if d3 is None:
        return sources
    settings = selection_identity(kd) | {"extra_root": str(d3.root)}
    _check_selection(directory, settings)
    share = work_share()
    selector = build_selector(kd, info, teacher)
    try:
        score(selector, d3.shards, directory, share=share, **score_args(kd))
    finally:
        release(selector)
    selection = wait_for_selection(d3, directory, kd, info.label_names, share)
    return [with_selection(s, selection) if s.selected else s for s in sources]


def _check_selection(directory: Path, settings: dict[str, Any]) -> None:
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
        views = []
        for s in self.sources:
            if self.kd_sets is None:
                reader = SourceReader(s.members)
                views.append(OnlineViews(s.recipe, reader, source=s.index, seed=self.seed, labelled=s.labelled))
            else:
                reader = SourceReader(s.members)
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

