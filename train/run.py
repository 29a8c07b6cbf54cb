"""`train(cfg)`: build every part from the composed config, fit, export. Plain function: tests call it directly.

One flat assembly: the data, the network, the data pipeline and objective, the module, the loggers and callbacks,
the Trainer; optional features (`distill`, `qat`) contribute their parts through `train.features`, never through
branches here. The parts themselves are built in `train.builders`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_pipes.shards.metadata import DatasetInfo
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
from train.cluster.resume import check_weights_fit
from train.export import export_model
from train.export.checkpoint import build_val_loader, export_workers
from train.export.provenance import run_provenance
from train.features import ExportContext, Features, build_features
from train.module import ImageClassifier
from train.nets import check_img_size, count_macs, create_model
from train.nets.configs import plain
from train.nets.files import METRICS_FILE
from train.preflight import check_required, preflight
from train.tracking import console
from train.tracking.axes import RunClock, declare_axes
from train.tracking.lineage import log_export
from train.tracking.loggers import RunIdentity, build_loggers, close_loggers, record_summary, wandb_location
from train.tracking.summary import RunSummary, finished_run

log = logging.getLogger(__name__)
console.quiet_known_warnings()  # the libraries' known noise, each with its reason (train.tracking.console)


def train(cfg: DictConfig, *, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Train the configured model; returns the final validation metrics (and the export's, when exported).

    `callbacks` are added to the run's own (for programmatic use: benchmarks, tests, notebooks). The job's signals
    are handled from here to the end (train.cluster.requeue): at the next step inside `fit`, at once outside it."""
    console.install()
    signals = cfg.callbacks.requeue
    with SignalGuard(signals=list(signals.signals), stop_signals=list(signals.stop_signals),
                     requeue=signals.requeue) as guard, console.RunLog() as run_log:
        return _train(cfg, guard, callbacks, run_log)


def _train(cfg: DictConfig, guard: SignalGuard, callbacks: Sequence[L.Callback],
           run_log: console.RunLog) -> dict[str, float]:
    clock = RunClock()  # the run's cost counts its set-up too
    check_required(cfg)  # `???` values: nothing can be read before they are set
    features = build_features(cfg)
    # Every problem the start can see, at once, before anything of it is written (train.preflight); a resume
    # continues the same run, a fresh start overwrites none.
    cleared = preflight(cfg, features)
    info, ckpt_path = cleared.info, cleared.ckpt_path
    done = finished_run(cfg.run_dir, max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
                        export=bool(cfg.export)) if ckpt_path is not None else None
    if done is not None:  # resuming a finished run: nothing to train, its export is current; say so, touch nothing
        row = done["summary"]
        log.info("%s is finished (%g epochs, step %s, val top-1 %.2f): nothing to train%s. Raise "
                 "trainer.max_epochs (or max_steps) to train on", cfg.run_dir, row.get("epochs", 0),
                 row.get("global_step"), row.get("val/acc1_final", float("nan")),
                 f"; its export is {Path(cfg.run_dir) / 'export'}" if cfg.export else "")
        return {k: float(v) for k, v in row.items() if k.startswith(("val/", "export/")) and _is_number(v)}
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)

    network_args = features.regularisation(model_rates(cfg))
    model = create_model(cfg.model.name, num_classes=info.num_classes, **network_args)
    data_config = model_data_config(model, cfg)
    img_size = data_config["input_size"][-1]
    check_img_size(model, img_size)
    macs = count_macs(model, img_size)
    model = features.wrap_network(model, img_size=img_size, info=info)
    data = features.data(labels_only(cfg, info, data_config), info=info, data_config=data_config)
    module = build_module(cfg, model, info, data_config, data, macs, features)
    check_weights_fit(ckpt_path, Path(cfg.run_dir), module)

    run_dir.mkdir(parents=True, exist_ok=True)  # the first file of this start: the parts above are built and fit
    run_log.open(run_dir)
    save_config(cfg, run_dir)
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
                           provenance, network_args=network_args)
    requeue = RequeueOnSignal(run_dir / "checkpoints" / "last.ckpt", guard=guard,
                              check_every_n_steps=cfg.callbacks.requeue.check_every_n_steps)
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
    log.info("%s", _start_line(cfg, info, trainer, model, macs, img_size, ckpt_path, run_dir))
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
        wandb_where = wandb_location(loggers)
    except Stopped:
        summary.end(trainer, None)
        close_loggers(loggers, success=True, preempted=True)  # a no-op when the stop already closed them
        raise
    except BaseException as e:
        summary.end(trainer, e)  # summary.json says the run failed, and why (train.compare shows it)
        close_loggers(loggers, success=False)  # what was logged reaches disk; a restart continues the run id
        raise
    close_loggers(loggers, success=True)
    if trainer.is_global_zero:
        log.info("%s", _end_line(row, run_dir, clock, shipped is not None, wandb_where))
    return metrics


def _start_line(cfg: DictConfig, info: DatasetInfo, trainer: L.Trainer, model: torch.nn.Module, macs: float,
                img_size: int, ckpt_path: str | None, run_dir: Path) -> str:
    """What trains on what, where: one line (Lightning's device lines and model table say less, in 20)."""
    world, device = trainer.world_size, trainer.strategy.root_device.type
    start = "a fresh start" if ckpt_path is None else f"resuming {ckpt_path}"
    features = ", ".join(f for f in ("distill" if cfg.distill else "", "qat" if cfg.qat else "",
                                     f"compile ({cfg.compile_mode})" if cfg.compile else "",
                                     f"ema {cfg.ema.decay}" if cfg.ema.decay else "") if f)
    return (f"{cfg.model.key} ({cfg.model.name}, {_params_m(model):.2f}M params, {macs / 1e6:.0f}M MACs at "
            f"{img_size} px){f' + {features}' if features else ''} | {info.root}: "
            f"{info.split('train').num_samples:,} train, {info.split('val').num_samples:,} val, "
            f"{info.num_classes} classes | {world} x {device}, {trainer.precision}, batch {cfg.data.batch_size} a "
            f"device | {cfg.trainer.max_epochs} epochs, seed {cfg.seed} | {start} | run dir {run_dir}")


def _end_line(row: dict[str, Any], run_dir: Path, clock: RunClock, exported: bool, wandb_where: str | None) -> str:
    """How the run ended and where everything is: one line."""
    top1, best = row.get("val/acc1_final"), row.get("val/acc1_best")
    parts = [f"done: {row.get('epochs', 0):g} epochs, step {row.get('global_step')}, "
             f"{clock.summary()['wall_clock_h'] * 3600:.0f} s"]
    if top1 is not None:
        parts.append(f"val top-1 {top1:.2f} (best {best:.2f})")
    if exported:
        parts.append(f"export {run_dir / 'export'} (top-1 {row.get('export/top1', float('nan')):.2f})")
    parts.append(f"checkpoints, summary.json, train.log in {run_dir}")
    if wandb_where:
        parts.append(wandb_where)
    return " | ".join(parts)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """`<run dir>/.hydra/config.yaml` (as composed) and `overrides.yaml` (the command line's), where Hydra would
    have put them: written here, once the start passed its preflight (a refused start writes nothing)."""
    directory = run_dir / ".hydra"
    directory.mkdir(exist_ok=True)
    OmegaConf.save(cfg, directory / "config.yaml")
    if HydraConfig.initialized():
        OmegaConf.save(HydraConfig.get().overrides.task, directory / "overrides.yaml")


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
                          latency=bool(cfg.export_latency), tflite=bool(cfg.export_tflite), record=provenance)
    if report.metrics.get("tflite_error"):
        record_summary(loggers, {"export/tflite_error": report.metrics["tflite_error"]})
    metrics = {**report.metrics, **features.export(ExportContext(
        trained=trained, shipped=shipped, export_dir=run_dir / "export", val_batches=loader, data_config=data_config,
        num_classes=info.num_classes, loggers=loggers, tflite=bool(cfg.export_tflite)))}
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
            "int8/latency_ms_1thread", "export/tflite_top1", "export/tflite_latency_ms", "int8/tflite_top1",
            "int8/tflite_latency_ms", "val/acc1_best", "img_size")
    return {"model": run["model"], "architecture": run["architecture"], "recipe": run["recipe"],
            "distill": run["distill"], "qat": run["qat"], **{k: row[k] for k in keys if k in row}}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
