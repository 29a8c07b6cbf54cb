"""The run's parts, each built from the composed config: public, so benchmarks and tests build exactly what a run
builds (the same datamodule, the same module) without copying it.

Config nodes become flat arguments here; nothing below this module receives a DictConfig.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from timm.data import resolve_model_data_config

from data_pipes.image.augment import build_eval_transform, build_train_transform
from data_pipes.shards.metadata import DatasetInfo
from data_pipes.stream.datamodule import ShardDataModule
from train.callbacks import AtomicCheckpointIO
from train.cluster import topology
from train.features.base import DataParts, Features
from train.module import ImageClassifier
from train.nets.configs import plain
from train.objective import ClassificationObjective, build_batch_mixing
from train.optim import optimizer_factory, scheduler_factory


def model_rates(cfg: DictConfig) -> dict[str, float | None]:
    """The model config's dropout and stochastic depth (a feature may set its own: `Feature.regularisation`)."""
    return {"drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}


def model_data_config(model: torch.nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Mean/std, crop and interpolation are the model's (timm); only the resolution is ours to choose."""
    size = cfg.data.img_size or cfg.model.resolution
    args = {"input_size": (3, size, size)} if size else {}
    data_config = resolve_model_data_config(model, args=args)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}


def datamodule_args(cfg: DictConfig, data_config: dict[str, Any]) -> dict[str, Any]:
    """The labels-only ShardDataModule's arguments: the `data` group, and transforms from `aug` and the model."""
    img_size = data_config["input_size"][-1]
    return dict(
        root=cfg.data.root,
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        train_transform=build_train_transform(img_size, **plain(cfg.aug.train), dct_reduce=cfg.data.train_dct_reduce),
        eval_transform=eval_transform(cfg, data_config),
        seed=cfg.seed,
        shuffle_window=cfg.data.shuffle_window,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def eval_transform(cfg: DictConfig, data_config: dict[str, Any]):
    """The model's eval preprocessing at the run's resolution (standard pixels unless data.eval_dct_reduce)."""
    return build_eval_transform(data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                                interpolation=data_config["interpolation"], dct_reduce=cfg.data.eval_dct_reduce)


def build_datamodule(cfg: DictConfig, data_config: dict[str, Any]) -> ShardDataModule:
    """The labels-only datamodule."""
    return ShardDataModule(**datamodule_args(cfg, data_config))


def labels_only(cfg: DictConfig, info: DatasetInfo, data_config: dict[str, Any]) -> DataParts:
    """A run without features: labelled shards, label-smoothed cross-entropy, the `aug.mixup` batch mixing."""
    args = datamodule_args(cfg, data_config)
    mixing = build_batch_mixing(num_classes=info.num_classes, label_smoothing=cfg.label_smoothing,
                                **plain(cfg.aug.mixup))
    return DataParts(ShardDataModule(**args), ClassificationObjective(cfg.label_smoothing), mixing, None, args)


def limited_batches(batches: int, limit: int | float | None) -> int:
    """Training batches of an epoch under Lightning's `limit_train_batches` (an int caps, a float is a fraction)."""
    if limit is None:
        return batches
    if isinstance(limit, float) and limit <= 1.0:
        return int(batches * limit)
    return min(batches, int(limit))


def build_module(cfg: DictConfig, model: torch.nn.Module, info: DatasetInfo, data_config: dict[str, Any],
                 data: DataParts, macs: float, features: Features) -> ImageClassifier:
    """The LightningModule: the network, the objective and mixing of `data`, and timm's optimizer and schedule
    (settings as the features leave them), sized by the stream's exact updates per epoch."""
    optim, sched = features.optimizer(dict(plain(cfg.optim)), dict(plain(cfg.sched)))
    datamodule = data.datamodule

    def world() -> int:
        return datamodule.trainer.world_size if datamodule.trainer else 1

    def updates_per_epoch() -> int:
        batches = limited_batches(datamodule.steps_per_epoch(world()), cfg.trainer.limit_train_batches)
        # Lightning steps the optimizer on the last, partial accumulation of an epoch too.
        return max(1, math.ceil(batches / cfg.trainer.accumulate_grad_batches))

    def global_batch() -> int:
        return int(cfg.data.batch_size) * world() * int(cfg.trainer.accumulate_grad_batches)

    return ImageClassifier(
        model,
        num_classes=info.num_classes,
        mean=data_config["mean"],
        std=data_config["std"],
        objective=data.objective,
        batch_mixing=data.batch_mixing,
        val_extras=data.val_extras,
        optimizer=optimizer_factory(**optim, global_batch=global_batch),
        scheduler=scheduler_factory(num_epochs=cfg.trainer.max_epochs, max_updates=cfg.trainer.max_steps, **sched),
        updates_per_epoch=updates_per_epoch,
        channels_last=cfg.channels_last,
        macs_per_image=macs,
    )


def trainer_kwargs(cfg: DictConfig, features: Features) -> dict[str, Any]:
    """lightning.Trainer's arguments: the `trainer` group, node and device counts from the launch, then the
    features' changes, then `precision: auto` resolved (bf16-mixed on a GPU that has it, else 32-true)."""
    kwargs = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    kwargs["num_nodes"], kwargs["devices"] = topology.resolve(kwargs["num_nodes"], kwargs["devices"])
    kwargs = features.trainer(kwargs)
    if kwargs.get("precision") == "auto":
        bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        kwargs["precision"] = "bf16-mixed" if bf16_gpu else "32-true"
    return kwargs


def plugins() -> list:
    """Atomic, safe checkpoint I/O, and under Slurm its environment (train.cluster.topology)."""
    environment = topology.slurm_environment()
    return [AtomicCheckpointIO(), *([environment] if environment is not None else [])]
