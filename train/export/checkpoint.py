"""A training checkpoint -> an export: the network rebuilt from it (float, QAT, or PTQ-calibrated), its val shards.

The checkpoint is read by the model layer's one loader (`train.nets.load`: safe loading, the keys it must hold);
settings a checkpoint leaves open (batch size, the int8 thresholds of checkpoints that predate them) are the run's
own, else what `python -m train` composes by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data_pipes.image.augment import build_eval_transform
from data_pipes.shards.make import default_workers
from data_pipes.shards.metadata import read_info
from data_pipes.stream.datamodule import build_eval_loader
from train.export.artifacts import ExportError, ExportReport, export_model
from train.export.provenance import command_line, git_state, versions
from train.nets.configs import compose_config
from train.nets.load import (
    build_network,
    checkpoint_network,
    is_qat_checkpoint,
    network_args,
    network_state,
    read_checkpoint,
)
from train.quant.deploy import Int8Report
from train.quant.recipe import PTQNetwork, export_int8, float_model, restore_network

# Loader processes for an export's evaluation (and PTQ calibration): one pass over the val split keeps a few busy.
EXPORT_WORKERS = 4
# PTQ: training batches (of the eval preprocessing) that calibrate the activation ranges.
CALIB_BATCHES = 32


def export_workers(available: int | None = None) -> int:
    """Loader processes for an export: EXPORT_WORKERS, or fewer when fewer are available (the run's
    data.num_workers; by default the CPUs this process may use)."""
    return max(0, min(EXPORT_WORKERS, default_workers() if available is None else available))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    latency: bool | None = None,
    tflite: bool | None = None,
) -> ExportReport:
    """Export a checkpoint of `python -m train`, evaluated on the val split of its (or the given) shard dir.

    `batch_size` defaults to the run's validation batch, `num_workers` to `export_workers()`, `device` to a GPU
    when there is one; `latency` and `tflite`, unless None, replace the run's export_latency (batch-1 CPU latency
    of the ONNX and LiteRT files) and export_tflite (model.tflite, with the litert extra)."""
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    name, label_names = _network_of(ckpt)
    model = checkpoint_network(ckpt)
    root = resolve_data_root(data_root, ckpt)
    _check_labels(root, label_names)
    loader = build_val_loader(root, ckpt["data_config"], batch_size=batch_size or run_batch_size(ckpt),
                              num_workers=export_workers(num_workers), dct_reduce=eval_dct_reduce(ckpt),
                              max_bad_fraction=run_bad_fraction(ckpt))
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    return export_model(model, out, architecture=name, label_names=label_names, data_config=ckpt["data_config"],
                        val_batches=loader, device=device or default_device(), latency=_export_latency(ckpt, latency),
                        tflite=_export_tflite(ckpt, tflite), record=_record(ckpt))


def export_quantized(
    ckpt_path: str | os.PathLike,
    *,
    ptq: bool,
    calib_batches: int = CALIB_BATCHES,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    latency: bool | None = None,
    ptq_observer: str | None = None,
    tflite: bool | None = None,
) -> tuple[ExportReport, Int8Report]:
    """The float export plus model_int8.pte / model_int8.onnx measured in their runtimes: from a QAT checkpoint
    (its fake-quant network), or with `ptq` from a float one (calibrated on `calib_batches` training batches with the
    eval preprocessing). `latency` and `ptq_observer`, unless None, replace the run's quant.latency (batch-1 CPU
    latency in each runtime) and quant.ptq_observer (how calibration sets activation ranges); `tflite`, unless None,
    the run's export_tflite (model.tflite and model_int8.tflite, with the litert extra)."""
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    name, label_names = _network_of(ckpt)
    data_config, img_size = ckpt["data_config"], int(ckpt["data_config"]["input_size"][-1])
    quant = quant_settings(ckpt, latency=latency, ptq_observer=ptq_observer)
    state = network_state(ckpt["state_dict"])
    if is_qat_checkpoint(ckpt):
        if ptq:
            raise ExportError(f"{ckpt_path} is a QAT checkpoint: it exports to int8 without --ptq")
        net = restore_network(name, len(label_names), img_size, quant, state, network_args(ckpt))
        model = float_model(net, name, len(label_names))
    else:
        if not ptq:
            raise ExportError(f"{ckpt_path} is a float checkpoint: pass --ptq for post-training int8 exports")
        model = build_network(name, len(label_names), state)
        net = None
    root = resolve_data_root(data_root, ckpt)
    _check_labels(root, label_names)
    batch_size, workers = batch_size or run_batch_size(ckpt), export_workers(num_workers)
    loader = build_val_loader(root, data_config, batch_size=batch_size, num_workers=workers,
                              dct_reduce=eval_dct_reduce(ckpt), max_bad_fraction=run_bad_fraction(ckpt))
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    report = export_model(model, out, architecture=name, label_names=label_names, data_config=data_config,
                          val_batches=loader, latency=_export_latency(ckpt, latency),
                          tflite=_export_tflite(ckpt, tflite), record=_record(ckpt))
    if net is None:
        net = PTQNetwork(build_network(name, len(label_names), state), img_size=img_size, quant=quant)
        net.calibrate(build_val_loader(root, data_config, batch_size=batch_size, num_workers=workers,
                                       dct_reduce=eval_dct_reduce(ckpt), max_bad_fraction=run_bad_fraction(ckpt),
                                       split="train"),
                      mean=data_config["mean"], std=data_config["std"], limit=calib_batches)
    int8 = export_int8(net, model, out, loader, img_size=img_size, mean=data_config["mean"], std=data_config["std"],
                       num_classes=len(label_names), min_agreement=quant["min_agreement"],
                       max_top1_drop=float(quant["max_top1_drop"]), latency=bool(quant["latency"]),
                       tflite=_export_tflite(ckpt, tflite))
    return report, int8


def quant_settings(ckpt: Mapping[str, Any], *, latency: bool | None, ptq_observer: str | None) -> dict[str, Any]:
    """The run's `quant` settings; keys a checkpoint predates take today's defaults; the command line's values (when
    not None) replace the run's."""
    quant = run_settings(ckpt, "quant")
    for key, value in (("latency", latency), ("ptq_observer", ptq_observer)):
        if value is not None:
            quant[key] = value
    return quant


def run_settings(ckpt: Mapping[str, Any], group: str) -> dict[str, Any]:
    """A config group of the run; keys a checkpoint predates (or a hand-made one lacks) take today's defaults, one
    level down too (quant.min_agreement.tflite for a run that predates LiteRT)."""
    defaults = OmegaConf.to_container(compose_config()[group], resolve=False)
    run = ckpt["run_config"].get(group) or {}
    return {**defaults, **{k: {**defaults[k], **v} if isinstance(v, Mapping) and isinstance(defaults.get(k), Mapping)
                           else v for k, v in run.items()}}


def run_batch_size(ckpt: Mapping[str, Any]) -> int:
    """The batch the run validated with (data.val_batch_size, else data.batch_size)."""
    data = run_settings(ckpt, "data")
    return int(data["val_batch_size"] or data["batch_size"])


def run_bad_fraction(ckpt: Mapping[str, Any]) -> float:
    """The run's data.max_bad_fraction: the share of undecodable images its evaluation tolerated."""
    return float(run_settings(ckpt, "data")["max_bad_fraction"])


def _network_of(ckpt: Mapping[str, Any]) -> tuple[str, list[str]]:
    return ckpt["run_config"]["model"]["name"], list(ckpt["dataset"]["label_names"])


def _export_latency(ckpt: Mapping[str, Any], override: bool | None) -> bool:
    """The command line's choice, else the run's export_latency (on for checkpoints that predate the key)."""
    return bool(ckpt["run_config"].get("export_latency", True)) if override is None else override


def _export_tflite(ckpt: Mapping[str, Any], override: bool | None) -> bool:
    """The command line's choice, else the run's export_tflite (on for checkpoints that predate the key)."""
    return bool(ckpt["run_config"].get("export_tflite", True)) if override is None else override


def _record(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The training run's provenance (what it was made from) and this export's command."""
    return {"trained": ckpt.get("provenance") or {}, "git": git_state(), "command": command_line(),
            "versions": versions()}


def resolve_data_root(data_root: str | os.PathLike | None, ckpt: Mapping[str, Any]) -> Path:
    """--data-root when given, else the shard dir the checkpoint was trained on."""
    hint = "pass --data-root DIR, the shard directory (val-*.tar + _info.json) the model was trained with"
    if data_root is not None:
        root, source = Path(data_root), "given by --data-root"
    else:
        recorded = (ckpt.get("dataset") or {}).get("root") or (ckpt["run_config"].get("data") or {}).get("root")
        if not recorded:
            raise ExportError(f"the checkpoint records no data root: {hint}")
        root, source = Path(recorded), "recorded in the checkpoint"
    root = root.expanduser()
    if not root.is_dir():
        raise ExportError(f"data root {root} ({source}) does not exist here: {hint}")
    return root


def _check_labels(root: Path, label_names: Sequence[str]) -> None:
    shards = list(read_info(root, check_files=False).label_names)
    if shards != list(label_names):
        common = min(len(shards), len(label_names))
        first = next((i for i, (a, b) in enumerate(zip(shards, label_names)) if a != b), common)
        raise ExportError(f"the shards at {root} have {len(shards)} classes, the checkpoint {len(label_names)}, "
                          f"first difference at index {first}: pass the --data-root the model was trained with")


def build_val_loader(root: str | os.PathLike, data_config: Mapping[str, Any], *, batch_size: int, num_workers: int,
                     dct_reduce: bool, max_bad_fraction: float, split: str = "val") -> Iterable:
    """The eval preprocessing over a split (val; train for PTQ calibration): the standard eval pixels unless
    `dct_reduce` (what a run with data.eval_dct_reduce=true validated on)."""
    transform = build_eval_transform(data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                                     interpolation=data_config["interpolation"], dct_reduce=dct_reduce)
    return build_eval_loader(root, transform, batch_size=batch_size, num_workers=num_workers,
                             max_bad_fraction=max_bad_fraction, split=split)


def eval_dct_reduce(ckpt: Mapping[str, Any]) -> bool:
    """The run's data.eval_dct_reduce: the pixels its validation used."""
    return bool(run_settings(ckpt, "data")["eval_dct_reduce"])


RUN_EXPORT = "export"  # the run's own export: `python -m train` writes it, its W&B model artifact references its files


def default_out_dir(ckpt_path: Path, *, replace: bool = False) -> Path:
    """Where a re-export goes: `<run dir>/export-<checkpoint name>` (e.g. `export-best`), beside the run's own
    `<run dir>/export`, whose files the run's W&B artifact references; with `replace`, that one itself.
    Checkpoints live in `<run dir>/checkpoints/`."""
    run_dir = ckpt_path.resolve().parent.parent
    return run_dir / (RUN_EXPORT if replace else f"{RUN_EXPORT}-{ckpt_path.stem}")
