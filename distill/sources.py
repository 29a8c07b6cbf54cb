"""The kd sources and the teacher as configured (`kd` group): what a build and a distillation run both start from.

A source (`kd.sources.d1|d2|d3`) is a shard set's train split, an augmentation recipe for its views, a number of
replicas (views per image), a mixing weight and whether its labels count; D3's members are a class-balanced
selection of its images (`distill.select`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from data_pipes.image.views import ViewRecipe
from data_pipes.shards.metadata import DatasetError, DatasetInfo, read_info
from data_pipes.stream.members import Members
from distill.kdset import KDSetError
from distill.teacher import Teacher, load_teacher

SOURCE_NAMES = ("d1", "d2", "d3")


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
    # D3: its class-balanced selection (`distill.select.Selection`); None: every image of the split
    selection: Any = field(default=None, compare=False, repr=False)

    @property
    def shards(self) -> list[tuple[Path, int]]:
        return self.info.shards("train")

    @cached_property
    def members(self) -> Members:
        """Which samples the source visits, block by block (made once: O(shards), or the selection's memory map)."""
        return Members(self.shards) if self.selection is None else self.selection.members(self.shards)

    @property
    def selected(self) -> bool:
        """Whether the source is a selection of its images (D3) rather than all of them."""
        return self.name == "d3"


def build_teacher(kd: Mapping[str, Any], info: DatasetInfo) -> Teacher:
    """The configured teacher, checked to predict the data's classes, at kd.teacher_img_size when that is set."""
    teacher = load_teacher(kd["teacher"], weights=kd["teacher_weights"], labels=kd["teacher_labels"],
                           num_classes=info.num_classes)
    teacher.check_classes(tuple(info.label_names), f"the data at {info.root}")
    if kd["teacher_img_size"]:
        teacher.data_config["input_size"] = [3, int(kd["teacher_img_size"]), int(kd["teacher_img_size"])]
    return teacher


def view_size(kd: Mapping[str, Any], student_size: int, teacher: Teacher) -> int:
    """The side of the views: kd.view_size, else the larger of the student's and the teacher's resolutions."""
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
