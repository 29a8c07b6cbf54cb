"""`train(cfg)`: build every part from the composed config, fit, export. Plain function: tests call it directly.

One flat assembly: the data, the network, the data pipeline and objective, the module, the loggers and callbacks,
the Trainer; optional features (`distill`, `qat`) contribute their parts through `train.features`, never through
branches here. The parts themselves are built in `train.builders`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from data_pipes.shards.metadata import DatasetInfo
from data_pipes.shards.prepare import prepare_dataset
from train.builders import (
    build_module,
    labels_only,
    model_data_config,
    model_rates,
    plugins,
    trainer_kwargs,
)
from train.callbacks import RunRecord, build_callbacks
from train.cluster.requeue import RequeueOnSignal, SignalGuard, Stopped
from train.cluster.resume import check_start, resolve_ckpt_path
from train.export import export_model
from train.export.checkpoint import build_val_loader, export_workers
from train.export.provenance import run_provenance
from train.features import ExportContext, Features, build_features
from train.module import ImageClassifier
from train.nets import check_img_size, check_model_name, count_macs, create_model
from train.nets.configs import plain
from train.nets.files import METRICS_FILE
from train.tracking.axes import RunClock, declare_axes
from train.tracking.lineage import log_export
from train.tracking.loggers import RunIdentity, build_loggers, close_loggers, record_summary
from train.tracking.summary import RunSummary

log = logging.getLogger(__name__)
# The module normalises uint8 batches in `on_after_batch_transfer` on purpose (on the device, after the copy);
# Lightning warns whenever a module overrides that hook while a datamodule is in use.
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`")
# The shard stream plans each worker's share itself, so its `__len__` is exact with any number of workers.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def train(cfg: DictConfig, *, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Train the configured model; returns the final validation metrics (and the export's, when exported).

    `callbacks` are added to the run's own (for programmatic use: benchmarks, tests, notebooks). The job's signals
    are handled from here to the end (train.cluster.requeue): at the next step inside `fit`, at once outside it."""
    signals = cfg.callbacks.requeue
    with SignalGuard(signals=list(signals.signals), stop_signals=list(signals.stop_signals),
                     requeue=signals.requeue) as guard:
        return _train(cfg, guard, callbacks)


def _train(cfg: DictConfig, guard: SignalGuard, callbacks: Sequence[L.Callback]) -> dict[str, float]:
    clock = RunClock()  # the run's cost counts its set-up too
    check_model_name(cfg.model.name)  # before touching data: a typo should not wait for a dataset
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = prepare_dataset(cfg.data.root, synthetic=plain(cfg.data.synthetic))
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    # Before anything of this start is written: a resume continues the same run, a fresh start overwrites none.
    check_start(ckpt_path, run_dir, model_name=cfg.model.name, label_names=info.label_names, data_root=info.root,
                qat=cfg.qat)
    features = build_features(cfg)

    model = create_model(cfg.model.name, num_classes=info.num_classes, **features.regularisation(model_rates(cfg)))
    data_config = model_data_config(model, cfg)
    img_size = data_config["input_size"][-1]
    check_img_size(model, img_size)
    macs = count_macs(model, img_size)
    model = features.wrap_network(model, img_size=img_size, info=info)
    data = features.data(labels_only(cfg, info, data_config), info=info, data_config=data_config)
    module = build_module(cfg, model, info, data_config, data, macs, features)

    record = features.record()
    provenance = run_provenance(info.root, record.get("kd"))
    identity = RunIdentity(model_key=cfg.model.key, family=cfg.model.family, recipe=cfg.recipe,
                           distill=cfg.distill, qat=cfg.qat, seed=cfg.seed)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # W&B's config: the composed config, plus what the run was made from (code, command, versions, data, teacher).
    loggers = build_loggers(run_dir, identity, wandb_enabled=cfg.logger.wandb.enabled, project=cfg.logger.wandb.project,
                            entity=cfg.logger.wandb.entity, mode=cfg.logger.wandb.mode, csv=cfg.logger.csv,
                            config={**resolved, "git": provenance["git"], "provenance": provenance})
    summary = RunSummary(run_dir, run=_run_description(cfg, identity, info, img_size),
                         static={"model/params_m": _params_m(model), "model/macs_m": macs / 1e6, "img_size": img_size},
                         paper=plain(cfg.model.get("paper")), provenance=provenance, clock=clock)
    run_record = RunRecord(resolved, {"root": str(info.root), "label_names": list(info.label_names)}, data_config,
                           provenance)
    requeue = RequeueOnSignal(run_dir / "checkpoints" / "last.ckpt", guard=guard)
    run_callbacks = build_callbacks(run_dir, every_n_train_steps=cfg.callbacks.checkpoint.every_n_train_steps,
                                    save_top_k=cfg.callbacks.checkpoint.save_top_k,
                                    lr_monitor=cfg.callbacks.lr_monitor, ema_decay=cfg.ema.decay,
                                    ema_warmup=cfg.ema.warmup, record=run_record, has_logger=bool(loggers),
                                    progress_refresh=cfg.trainer.log_every_n_steps if cfg.callbacks.progress_bar
                                    else None, seed=cfg.seed)
    trainer = L.Trainer(**trainer_kwargs(cfg, features), default_root_dir=run_dir, logger=loggers or False,
                        callbacks=[*run_callbacks, clock, summary, *data.datamodule.callbacks(), *features.callbacks(),
                                   requeue, *callbacks],
                        enable_progress_bar=cfg.callbacks.progress_bar, plugins=plugins())
    declare_axes(loggers)
    record_summary(loggers, {**summary.flat(), **record})
    features.declare_inputs(loggers)

    try:
        trainer.fit(module, datamodule=data.datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        guard.phase = "the export"  # a signal now requeues at once: the resumed job exports from the last checkpoint
        shipped = None
        if cfg.export and trainer.is_global_zero:
            metrics.update(_export(cfg, run_dir, module, info, data_config, features, loggers, provenance))
            shipped = json.loads((run_dir / "export" / METRICS_FILE).read_text())
        row = summary.finish(trainer, loggers, shipped)
        if shipped is not None:
            log_export(loggers, run_dir / "export", metadata=_export_metadata(row, summary.run),
                       best=summary.exported_best)
    except Stopped:
        close_loggers(loggers, success=True, preempted=True)  # a no-op when the stop already closed them
        raise
    except BaseException:
        close_loggers(loggers, success=False)  # what was logged reaches disk; a restart continues the run id
        raise
    close_loggers(loggers, success=True)
    return metrics


def _export(cfg: DictConfig, run_dir: Path, module: ImageClassifier, info: DatasetInfo, data_config: dict[str, Any],
            features: Features, loggers: list, provenance: dict[str, Any]) -> dict[str, float]:
    """The float export (and the features' files beside it), measured on the run's val split."""
    loader = build_val_loader(info.root, data_config, batch_size=cfg.data.val_batch_size or cfg.data.batch_size,
                              num_workers=export_workers(cfg.data.num_workers),
                              dct_reduce=cfg.data.eval_dct_reduce, max_bad_fraction=cfg.data.max_bad_fraction)
    device = module.device  # the float export's top-1 is measured where training ran (in fp32), not on the CPU
    trained = module.model.cpu().eval()
    shipped = features.shipped_network(trained, num_classes=info.num_classes)
    report = export_model(shipped, run_dir / "export", architecture=cfg.model.name, label_names=info.label_names,
                          data_config=data_config, val_batches=loader, device=device,
                          latency=bool(cfg.export_latency), record=provenance)
    metrics = {**report.metrics, **features.export(ExportContext(
        trained=trained, shipped=shipped, export_dir=run_dir / "export", val_batches=loader, data_config=data_config,
        num_classes=info.num_classes, loggers=loggers))}
    return {f"export/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


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


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
