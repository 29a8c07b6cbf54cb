"""What an optional feature of a run is: one object that contributes its parts to the assembly (`train.run`).

Every hook has a default that adds nothing, so a feature writes only the parts it changes, and `Features` applies
every chosen feature's hook in turn. The assembly calls each hook once, at the point the part is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from data_pipes.errors import Problems
from data_pipes.shards.metadata import DatasetInfo
from data_pipes.stream.datamodule import ShardDataModule

BatchMixing = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class DataParts:
    """What the run trains on and minimises: the datamodule, the objective, the batch mixing in front of it, extra
    validation metrics, and the arguments that made the labels-only datamodule (a feature may make its own from
    them)."""

    datamodule: ShardDataModule
    objective: nn.Module
    batch_mixing: BatchMixing
    val_extras: nn.Module | None
    datamodule_args: Mapping[str, Any]


@dataclass(frozen=True)
class ExportContext:
    """What an export step works with: the network as trained, the float network the export shipped, where it
    shipped it, the val batches it measured, the run's data config and its loggers, and whether the export writes
    LiteRT files (export_tflite)."""

    trained: nn.Module
    shipped: nn.Module
    export_dir: Path
    val_batches: Iterable
    data_config: Mapping[str, Any]
    num_classes: int
    loggers: Sequence[Logger]
    tflite: bool


class Feature:
    """An optional feature of a run; each hook returns its part unchanged unless the feature changes it."""

    def preflight(self, problems: Problems, *, info: DatasetInfo | None, trainer: Mapping[str, Any]) -> None:
        """Add a problem for each input of the feature that would stop the run (train.preflight, before anything is
        written). `info`: the data, None when it was refused; `trainer`: the `trainer` group as configured."""

    def regularisation(self, rates: dict[str, float | None]) -> dict[str, float | None]:
        """The network's dropout and stochastic-depth rates."""
        return rates

    def wrap_network(self, model: nn.Module, *, img_size: int, info: DatasetInfo) -> nn.Module:
        """The network that trains (its float weights, architecture and size are checked by then)."""
        return model

    def data(self, parts: DataParts, *, info: DatasetInfo, data_config: Mapping[str, Any]) -> DataParts:
        """The data, objective, batch mixing and validation metrics."""
        return parts

    def optimizer(self, optim: dict[str, Any], sched: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The `optim` and `sched` settings the optimizer and schedule are built from."""
        return optim, sched

    def trainer(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Lightning Trainer arguments (precision still as configured: `auto` is resolved after every feature)."""
        return kwargs

    def callbacks(self) -> list[Callback]:
        return []

    def record(self) -> dict[str, Any]:
        """What the run records about the feature (W&B summary and config, provenance, checkpoints)."""
        return {}

    def declare_inputs(self, loggers: Sequence[Logger]) -> None:
        """Declare what the run learns from as W&B input artifacts."""

    def shipped_network(self, trained: nn.Module, *, num_classes: int) -> nn.Module:
        """The float network the export ships, from the network as trained (on the CPU, in eval mode)."""
        return trained

    def export(self, context: ExportContext) -> dict[str, Any]:
        """Files beside the float export, measured; returns the metrics they add."""
        return {}


class Features(Feature):
    """The chosen features, as one: each hook runs every feature's in turn."""

    def __init__(self, features: Iterable[Feature]) -> None:
        self.features = tuple(features)

    def preflight(self, problems: Problems, *, info: DatasetInfo | None, trainer: Mapping[str, Any]) -> None:
        for feature in self.features:
            feature.preflight(problems, info=info, trainer=trainer)

    def regularisation(self, rates: dict[str, float | None]) -> dict[str, float | None]:
        for feature in self.features:
            rates = feature.regularisation(rates)
        return rates

    def wrap_network(self, model: nn.Module, *, img_size: int, info: DatasetInfo) -> nn.Module:
        for feature in self.features:
            model = feature.wrap_network(model, img_size=img_size, info=info)
        return model

    def data(self, parts: DataParts, *, info: DatasetInfo, data_config: Mapping[str, Any]) -> DataParts:
        for feature in self.features:
            parts = feature.data(parts, info=info, data_config=data_config)
        return parts

    def optimizer(self, optim: dict[str, Any], sched: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        for feature in self.features:
            optim, sched = feature.optimizer(optim, sched)
        return optim, sched

    def trainer(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for feature in self.features:
            kwargs = feature.trainer(kwargs)
        return kwargs

    def callbacks(self) -> list[Callback]:
        return [callback for feature in self.features for callback in feature.callbacks()]

    def record(self) -> dict[str, Any]:
        return {key: value for feature in self.features for key, value in feature.record().items()}

    def declare_inputs(self, loggers: Sequence[Logger]) -> None:
        for feature in self.features:
            feature.declare_inputs(loggers)

    def shipped_network(self, trained: nn.Module, *, num_classes: int) -> nn.Module:
        for feature in self.features:
            trained = feature.shipped_network(trained, num_classes=num_classes)
        return trained

    def export(self, context: ExportContext) -> dict[str, Any]:
        return {key: value for feature in self.features for key, value in feature.export(context).items()}
