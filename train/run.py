"""`train(cfg)`: build every part from the composed config, fit, export. Plain function: tests call it directly."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_model_data_config

from data_pipes.image.augment import build_eval_transform, build_train_transform
from data_pipes.shards.metadata import DatasetInfo
from data_pipes.shards.prepare import prepare_dataset
from data_pipes.stream.datamodule import ShardDataModule
from train import topology
from train.axes import RunClock, declare_axes
from train.callbacks import AtomicCheckpointIO, RunRecord, build_callbacks
from train.export.artifacts import METRICS_FILE
from train.lineage import log_export, use_inputs
from train.models import check_img_size, check_model_name, count_macs, create_model
from train.module import ImageClassifier
from train.objective import ClassificationObjective, NoMixing, build_batch_mixing
from train.optim import optimizer_factory, scheduler_factory
from train.provenance import run_provenance
from train.quant.backend import QuantError
from train.requeue import RequeueOnSignal, resolve_ckpt_path
from train.summary import RunSummary
from train.tracking import RunIdentity, build_loggers, close_loggers, record_summary

log = logging.getLogger(__name__)
# The module normalises uint8 batches in `on_after_batch_transfer` on purpose (on the device, after the copy);
# Lightning warns whenever a module overrides that hook while a datamodule is in use.
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`")
# The shard stream plans each worker's share itself, so its `__len__` is exact with any number of workers.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def train(cfg: DictConfig, *, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Train the configured model; returns the final validation metrics (and the export's, when exported).

    `callbacks` are added to the run's own (for programmatic use: benchmarks, tests, notebooks)."""
    clock = RunClock()  # the run's cost counts its set-up too
    check_model_name(cfg.model.name)  # before touching data: a typo should not wait for a dataset
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = prepare_dataset(cfg.data.root, synthetic=_plain(cfg.data.synthetic))

    model = create_model(cfg.model.name, num_classes=info.num_classes, **_regularisation(cfg))
    data_config = _data_config(model, cfg)
    img_size = data_config["input_size"][-1]
    check_img_size(model, img_size)
    macs = count_macs(model, img_size)
    if cfg.qat:
        model = _fake_quant(cfg, model, info, img_size)

    datamodule, objective, val_extras, kd_record = _build_data_and_objective(cfg, info, data_config)
    module = _build_module(cfg, model, info, data_config, datamodule, macs, objective, val_extras)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    provenance = run_provenance(info.root, kd_record.get("kd"))
    identity = RunIdentity(model_key=cfg.model.key, family=cfg.model.family, recipe=cfg.recipe,
                           distill=cfg.distill, qat=cfg.qat, seed=cfg.seed)
    # W&B's config: the composed config, plus what the run was made from (code, command, versions, data, teacher).
    loggers = build_loggers(run_dir, identity, wandb_enabled=cfg.logger.wandb.enabled, project=cfg.logger.wandb.project,
                            entity=cfg.logger.wandb.entity, mode=cfg.logger.wandb.mode, csv=cfg.logger.csv,
                            config={**resolved, "git": provenance["git"], "provenance": provenance})
    record = RunRecord(resolved, {"root": str(info.root), "label_names": list(info.label_names)}, data_config,
                       provenance)
    summary = RunSummary(run_dir, run=_run_description(cfg, identity, info, img_size),
                         static={"model/params_m": _params_m(model), "model/macs_m": macs / 1e6, "img_size": img_size},
                         paper=_plain(cfg.model.get("paper")), provenance=provenance, clock=clock)
    run_callbacks = build_callbacks(run_dir, every_n_train_steps=cfg.callbacks.checkpoint.every_n_train_steps,
                                save_top_k=cfg.callbacks.checkpoint.save_top_k, lr_monitor=cfg.callbacks.lr_monitor,
                                ema_decay=cfg.ema.decay, ema_warmup=cfg.ema.warmup, record=record,
                                has_logger=bool(loggers),
                                progress_refresh=cfg.trainer.log_every_n_steps if cfg.callbacks.progress_bar else None)
    run_callbacks += [clock, summary]
    signals = cfg.callbacks.requeue
    requeue = RequeueOnSignal(run_dir / "checkpoints" / "last.ckpt", signals=list(signals.signals),
                              stop_signals=list(signals.stop_signals), requeue=signals.requeue)
    trainer = L.Trainer(**_trainer_kwargs(cfg), default_root_dir=run_dir, logger=loggers or False,
                        callbacks=[*run_callbacks, *datamodule.callbacks(), *_qat_callbacks(cfg), requeue, *callbacks],
                        enable_progress_bar=cfg.callbacks.progress_bar, plugins=_plugins())
    declare_axes(loggers)
    record_summary(loggers, {**summary.flat(), **kd_record})
    if cfg.distill:
        use_inputs(loggers, teacher=kd_record["kd"]["teacher"], kd_sets=cfg.kd.sets,
                   kd_identity=kd_record["kd"].get("sets"))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, run_dir),
                    weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shipped = None
        if cfg.export and trainer.is_global_zero:
            metrics.update(_export(run_dir, module, info, data_config, cfg, loggers, provenance))
            shipped = json.loads((run_dir / "export" / METRICS_FILE).read_text())
        row = summary.finish(trainer, loggers, shipped)
        if shipped is not None:
            log_export(loggers, run_dir / "export", metadata=_export_metadata(row, summary.run),
                       best=summary.exported_best)
    except BaseException:
        close_loggers(loggers, success=False)  # what was logged reaches disk; a restart continues the run id
        raise
    close_loggers(loggers, success=True)
    return metrics


def _run_description(cfg: DictConfig, identity: RunIdentity, info: DatasetInfo, img_size: int) -> dict[str, Any]:
    return {"name": identity.name, "model": cfg.model.key, "architecture": cfg.model.name, "family": cfg.model.family,
            "recipe": cfg.recipe, "distill": bool(cfg.distill), "qat": bool(cfg.qat), "seed": int(cfg.seed),
            "img_size": img_size, "dataset": info.name or Path(info.root).name, "num_classes": info.num_classes,
            "train_images": info.split("train").num_samples}


def _export_metadata(row: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What the export artifact carries in W&B: the numbers its users choose by."""
    keys = ("export/top1", "export/top5", "model/macs_m", "model/params_m", "export/latency_ms_1thread",
            "export/latency_ms_all_threads", "export/size_mb", "int8/pte_top1", "int8/onnx_top1",
            "int8/latency_ms_1thread", "val/acc1_best", "img_size")
    return {"model": run["model"], "architecture": run["architecture"], "recipe": run["recipe"],
            "distill": run["distill"], "qat": run["qat"], **{k: row[k] for k in keys if k in row}}


def _plugins() -> list:
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # our RequeueOnSignal checkpoints and requeues; Lightning's own would too, mid-step
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _data_config(model: torch.nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Mean/std, crop and interpolation are the model's (timm); only the resolution is ours to choose."""
    size = cfg.data.img_size or cfg.model.resolution
    args = {"input_size": (3, size, size)} if size else {}
    data_config = resolve_model_data_config(model, args=args)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}


def _regularisation(cfg: DictConfig) -> dict[str, float | None]:
    """The model's dropout and stochastic depth; a distillation recipe may set its own (kd.drop_rate, ...)."""
    rates = {"drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}
    if cfg.distill:
        rates.update({k: cfg.kd[k] for k in rates if cfg.kd[k] is not None})
    return rates


def _datamodule_args(cfg: DictConfig, data_config: dict[str, Any]) -> dict[str, Any]:
    img_size = data_config["input_size"][-1]
    return dict(
        root=cfg.data.root,
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        train_transform=build_train_transform(img_size, **_plain(cfg.aug.train), dct_reduce=cfg.data.train_dct_reduce),
        eval_transform=build_eval_transform(img_size, crop_pct=data_config["crop_pct"],
                                            interpolation=data_config["interpolation"],
                                            dct_reduce=cfg.data.eval_dct_reduce),
        seed=cfg.seed,
        shuffle_window=cfg.data.shuffle_window,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def _build_datamodule(cfg: DictConfig, data_config: dict[str, Any]) -> ShardDataModule:
    """The labels-only datamodule (the benchmarks build it too)."""
    return ShardDataModule(**_datamodule_args(cfg, data_config))


def _build_data_and_objective(cfg: DictConfig, info: DatasetInfo, data_config: dict[str, Any]):
    """The datamodule, the objective and extra validation metrics: labels only, or a distillation recipe's."""
    args = _datamodule_args(cfg, data_config)
    if not cfg.distill:
        return _build_datamodule(cfg, data_config), ClassificationObjective(cfg.label_smoothing), None, {}
    from distill.recipe import build_distillation

    kd = build_distillation(cfg, info, data_config, args)
    return kd.datamodule, kd.objective, kd.val_extras, {"kd": kd.record}


def _build_module(cfg: DictConfig, model: torch.nn.Module, info: DatasetInfo, data_config: dict[str, Any],
                  datamodule: ShardDataModule, macs: float, objective: torch.nn.Module,
                  val_extras: torch.nn.Module | None) -> ImageClassifier:
    optim = dict(_plain(cfg.optim))
    sched = dict(_plain(cfg.sched))
    if cfg.qat:  # QAT fine-tunes at a fraction of the float recipe's lr
        optim["lr"] *= float(cfg.quant.lr_scale)
        for key in ("warmup_lr", "min_lr"):
            if sched.get(key):
                sched[key] *= float(cfg.quant.lr_scale)

    def updates_per_epoch() -> int:
        world = datamodule.trainer.world_size if datamodule.trainer else 1
        batches = limited_batches(datamodule.steps_per_epoch(world), cfg.trainer.limit_train_batches)
        # Lightning steps the optimizer on the last, partial accumulation of an epoch too.
        return max(1, math.ceil(batches / cfg.trainer.accumulate_grad_batches))

    def global_batch() -> int:
        world = datamodule.trainer.world_size if datamodule.trainer else 1
        return int(cfg.data.batch_size) * world * int(cfg.trainer.accumulate_grad_batches)

    return ImageClassifier(
        model,
        num_classes=info.num_classes,
        mean=data_config["mean"],
        std=data_config["std"],
        objective=objective,
        batch_mixing=_batch_mixing(cfg, info),
        val_extras=val_extras,
        optimizer=optimizer_factory(**optim, global_batch=global_batch),
        scheduler=scheduler_factory(num_epochs=cfg.trainer.max_epochs, max_updates=cfg.trainer.max_steps, **sched),
        updates_per_epoch=updates_per_epoch,
        channels_last=cfg.channels_last,
        macs_per_image=macs,
    )


def limited_batches(batches: int, limit: int | float | None) -> int:
    """Training batches of an epoch under Lightning's `limit_train_batches` (an int caps, a float is a fraction)."""
    if limit is None:
        return batches
    if isinstance(limit, float) and limit <= 1.0:
        return int(batches * limit)
    return min(batches, int(limit))


def _batch_mixing(cfg: DictConfig, info: DatasetInfo):
    if cfg.distill and cfg.kd.method == "soft_target":
        return NoMixing()  # the recipe's views are already mixed where the recipe mixes (D2); the student only flips
    return build_batch_mixing(num_classes=info.num_classes, label_smoothing=cfg.label_smoothing,
                              **_plain(cfg.aug.mixup))


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = {k: v for k, v in _plain(cfg.trainer).items() if v is not None}
    kwargs["num_nodes"], kwargs["devices"] = topology.resolve(kwargs["num_nodes"], kwargs["devices"])
    if cfg.qat:  # fake quantization simulates int8 arithmetic in fp32; observers see fp32 ranges
        if kwargs.get("precision") not in ("auto", "32", "32-true"):
            raise QuantError(f"qat=true trains in fp32; trainer.precision={kwargs.get('precision')} would change "
                             f"the ranges the observers see: drop the override (auto picks 32-true)")
        kwargs["precision"] = "32-true"
    if kwargs.get("precision") == "auto":
        bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        kwargs["precision"] = "bf16-mixed" if bf16_gpu else "32-true"
    return kwargs


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _export(run_dir: Path, module: ImageClassifier, info: DatasetInfo, data_config: dict[str, Any], cfg: DictConfig,
            loggers: list, provenance: dict[str, Any]) -> dict[str, float]:
    from data_pipes.stream.datamodule import build_eval_loader
    from train.export import export_model

    img_size = data_config["input_size"][-1]
    loader = build_eval_loader(info.root, build_eval_transform(img_size, crop_pct=data_config["crop_pct"],
                                                               interpolation=data_config["interpolation"],
                                                               dct_reduce=cfg.data.eval_dct_reduce),
                               batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
                               num_workers=min(cfg.data.num_workers, 4))
    device = module.device  # the float export's top-1 is measured where training ran (in fp32), not on the CPU
    network = module.model.cpu().eval()
    if cfg.qat:
        from train.quant.recipe import float_model

        network = float_model(module.model, cfg.model.name, info.num_classes)
    report = export_model(network, run_dir / "export", architecture=cfg.model.name,
                          label_names=info.label_names, data_config=data_config, val_batches=loader, device=device,
                          latency=bool(cfg.export_latency), record=provenance)
    metrics = dict(report.metrics)
    if cfg.qat:
        from train.quant.recipe import export_int8

        int8 = export_int8(module.model, network, run_dir / "export", loader, img_size=img_size,
                           mean=data_config["mean"], std=data_config["std"], num_classes=info.num_classes,
                           min_agreement=_plain(cfg.quant.min_agreement),
                           max_top1_drop=float(cfg.quant.max_top1_drop), latency=bool(cfg.quant.latency))
        metrics.update(int8.metrics)
        for failure in int8.failures:
            record_summary(loggers, {"export/int8_failure": failure})
        for key in ("int8_kept_float", "pte_outside_xnnpack"):  # what stayed float, where the backend kept it so
            if int8.metrics[key]:
                record_summary(loggers, {f"export/{key}": ", ".join(f"{k} x{n}" for k, n in int8.metrics[key].items())})
    return {f"export/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _fake_quant(cfg: DictConfig, model: torch.nn.Module, info: DatasetInfo, img_size: int) -> torch.nn.Module:
    from train.quant.recipe import build_network

    return build_network(model, init_from=cfg.init_from, name=cfg.model.name, label_names=info.label_names,
                         img_size=img_size, quant=_plain(cfg.quant))


def _qat_callbacks(cfg: DictConfig) -> list[L.Callback]:
    if not cfg.qat:
        return []
    from train.quant.recipe import QATSchedule

    return [QATSchedule(cfg.quant.freeze_bn_epoch, cfg.quant.freeze_observer_epoch)]
