"""A training checkpoint -> an export: safe loading, the network rebuilt from it, its val shards; the CLI."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.export.artifacts import DATA_CONFIG_KEYS, ExportError, ExportReport, export_model
from train.quant.backend import PTQ_OBSERVERS

CHECKPOINT_KEYS = ("state_dict", "run_config", "dataset", "data_config")
NETWORK_PREFIX = "model."
TRAIN_HINT = "`python -m train` (it writes <run dir>/checkpoints/last.ckpt and best.ckpt)"


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 4,
    device: str | torch.device = "cpu",
    latency: bool | None = None,
) -> ExportReport:
    """Export a checkpoint of `python -m train`, evaluated on the val split of its (or the given) shard dir.
    `latency`, unless None, replaces the run's export_latency (batch-1 CPU latency of the ONNX file)."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    name = ckpt["run_config"]["model"]["name"]
    label_names = list(ckpt["dataset"]["label_names"])
    model = build_network(name, len(label_names), network_state(ckpt["state_dict"]))
    root = resolve_data_root(data_root, ckpt)
    _check_labels(root, label_names)
    loader = build_val_loader(root, ckpt["data_config"], batch_size=batch_size, num_workers=num_workers,
                              dct_reduce=eval_dct_reduce(ckpt))
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    return export_model(model, out, architecture=name, label_names=label_names, data_config=ckpt["data_config"],
                        val_batches=loader, device=device, latency=_export_latency(ckpt, latency),
                        record=_record(ckpt))


def _export_latency(ckpt: Mapping[str, Any], override: bool | None) -> bool:
    """The command line's choice, else the run's export_latency (on for checkpoints that predate the key)."""
    return bool(ckpt["run_config"].get("export_latency", True)) if override is None else override


def _record(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The training run's provenance (what it was made from) and this export's command."""
    from train.provenance import command_line, git_state, versions

    run = ckpt.get("provenance") or {}
    return {"trained": run, "git": git_state(), "command": command_line(), "versions": versions()}


def export_quantized(
    ckpt_path: str | os.PathLike,
    *,
    ptq: bool,
    calib_batches: int = 32,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 4,
    latency: bool | None = None,
    ptq_observer: str | None = None,
):
    """The float export plus model_int8.pte / model_int8.onnx measured in their runtimes: from a QAT checkpoint
    (its fake-quant network), or with `ptq` from a float one (calibrated on `calib_batches` training batches with the
    eval preprocessing). `latency` and `ptq_observer`, unless None, replace the run's quant.latency (batch-1 CPU
    latency in each runtime) and quant.ptq_observer (how calibration sets activation ranges).
    Returns (ExportReport, Int8Report)."""
    from train.quant.recipe import PTQNetwork, export_int8, float_model

    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    run_config = ckpt["run_config"]
    name, label_names = run_config["model"]["name"], list(ckpt["dataset"]["label_names"])
    data_config, img_size = ckpt["data_config"], int(ckpt["data_config"]["input_size"][-1])
    quant = {**_default_quant(), **(run_config.get("quant") or {})}  # keys a checkpoint predates: the defaults
    for key, value in (("latency", latency), ("ptq_observer", ptq_observer)):  # the command line's, over the run's
        if value is not None:
            quant[key] = value
    state = network_state(ckpt["state_dict"])
    if run_config.get("qat"):
        if ptq:
            raise ExportError(f"{ckpt_path} is a QAT checkpoint: it exports to int8 without --ptq")
        net = _qat_network(name, len(label_names), img_size, quant, state)
        model = float_model(net, name, len(label_names))
    else:
        if not ptq:
            raise ExportError(f"{ckpt_path} is a float checkpoint: pass --ptq for post-training int8 exports")
        model = build_network(name, len(label_names), state)
        net = None
    root = resolve_data_root(data_root, ckpt)
    _check_labels(root, label_names)
    loader = build_val_loader(root, data_config, batch_size=batch_size, num_workers=num_workers,
                              dct_reduce=eval_dct_reduce(ckpt))
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    report = export_model(model, out, architecture=name, label_names=label_names, data_config=data_config,
                          val_batches=loader, latency=_export_latency(ckpt, latency), record=_record(ckpt))
    if net is None:
        net = PTQNetwork(build_network(name, len(label_names), state), img_size=img_size, quant=quant)
        net.calibrate(build_val_loader(root, data_config, batch_size=batch_size, num_workers=num_workers,
                                       dct_reduce=eval_dct_reduce(ckpt),
                                       split="train"),
                      mean=data_config["mean"], std=data_config["std"], limit=calib_batches)
    int8 = export_int8(net, model, out, loader, img_size=img_size, mean=data_config["mean"], std=data_config["std"],
                       num_classes=len(label_names), min_agreement=quant["min_agreement"],
                       max_top1_drop=float(quant["max_top1_drop"]), latency=bool(quant["latency"]))
    return report, int8


def _default_quant() -> dict[str, Any]:
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "quant" / "xnnpack.yaml"
    return OmegaConf.to_container(OmegaConf.load(conf), resolve=True)


def _qat_network(name: str, num_classes: int, img_size: int, quant: Mapping[str, Any],
                 state: Mapping[str, torch.Tensor]):
    from train.models import create_model
    from train.quant.backend import quantizer
    from train.quant.network import FakeQuantNetwork

    q = quantizer(str(quant["backend"]), weight_bits=int(quant["weight_bits"]), qat=True)
    net = FakeQuantNetwork(create_model(name, num_classes=num_classes), img_size=img_size, quantizer=q)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the QAT checkpoint does not fit a fresh {name} fake-quant network: {str(e)[:400]}") \
            from None
    return net.eval()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as plain data (never unpickling code), with the keys the export needs."""
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist; checkpoints are written by {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise ExportError(f"{path} is not a PyTorch checkpoint; export one written by {TRAIN_HINT}") from None
        raise ExportError(f"refusing {path}: it holds a pickled Python object ({found.group(1)}), which safe loading "
                          f"(torch.load weights_only=True) does not run. Checkpoints of this project hold only "
                          f"tensors and plain values; export one written by {TRAIN_HINT}") from None
    except RuntimeError as e:
        raise ExportError(f"{path} is not a readable PyTorch checkpoint ({e}); export one written by "
                          f"{TRAIN_HINT}") from None
    _check_checkpoint(path, ckpt)
    return ckpt


def _check_checkpoint(path: Path, ckpt: Any) -> None:
    missing = _missing_keys(ckpt) if isinstance(ckpt, dict) else [f"everything (it holds a {type(ckpt).__name__})"]
    if missing:
        raise ExportError(f"{path} is not a checkpoint of this project's training: it lacks {', '.join(missing)}. "
                          f"Export a checkpoint written by {TRAIN_HINT}")


def _missing_keys(ckpt: dict[str, Any]) -> list[str]:
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        return missing
    nested = {"run_config['model']['name']": _dig(ckpt, "run_config", "model", "name"),
              "dataset['label_names']": _dig(ckpt, "dataset", "label_names")}
    missing = [k for k, v in nested.items() if v is None]
    return missing + [f"data_config[{k!r}]" for k in DATA_CONFIG_KEYS if _dig(ckpt, "data_config", k) is None]


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def network_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights from a LightningModule state_dict (`model.` prefix; EMA weights when EMA was on)."""
    # torch.compile wraps the network as `_orig_mod`; its weights are the plain network's.
    state = {k[len(NETWORK_PREFIX):].replace("_orig_mod.", ""): v for k, v in state_dict.items()
             if k.startswith(NETWORK_PREFIX)}
    if not state:
        raise ExportError(f"the checkpoint's state_dict has no '{NETWORK_PREFIX}*' keys (the network's weights); "
                          f"export a checkpoint written by {TRAIN_HINT}")
    return state


def build_network(name: str, num_classes: int, state: Mapping[str, torch.Tensor]) -> nn.Module:
    from train.models import UnknownModelError, create_model

    try:
        model = create_model(name, num_classes=num_classes)
    except UnknownModelError as e:
        raise ExportError(f"the checkpoint's model: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the checkpoint's weights do not fit {name} with {num_classes} classes: {e}") from None
    return model.eval()


def resolve_data_root(data_root: str | os.PathLike | None, ckpt: Mapping[str, Any]) -> Path:
    """--data-root when given, else the shard dir the checkpoint was trained on."""
    hint = "pass --data-root DIR, the shard directory (val-*.tar + _info.json) the model was trained with"
    if data_root is not None:
        root, source = Path(data_root), "given by --data-root"
    else:
        recorded = _dig(ckpt, "dataset", "root") or _dig(ckpt, "run_config", "data", "root")
        if not recorded:
            raise ExportError(f"the checkpoint records no data root: {hint}")
        root, source = Path(recorded), "recorded in the checkpoint"
    root = root.expanduser()
    if not root.is_dir():
        raise ExportError(f"data root {root} ({source}) does not exist here: {hint}")
    return root


def _check_labels(root: Path, label_names: Sequence[str]) -> None:
    from data_pipes.shards.metadata import read_info

    shards = list(read_info(root, check_files=False).label_names)
    if shards != list(label_names):
        common = min(len(shards), len(label_names))
        first = next((i for i, (a, b) in enumerate(zip(shards, label_names)) if a != b), common)
        raise ExportError(f"the shards at {root} have {len(shards)} classes, the checkpoint {len(label_names)}, "
                          f"first difference at index {first}: pass the --data-root the model was trained with")


def build_val_loader(root: Path, data_config: Mapping[str, Any], *, batch_size: int, num_workers: int,
                     dct_reduce: bool, split: str = "val") -> Iterable:
    """The eval preprocessing over a split (val; train for PTQ calibration): the standard eval pixels unless
    `dct_reduce` (what a run with data.eval_dct_reduce=true validated on)."""
    from data_pipes.image.augment import build_eval_transform
    from data_pipes.stream.datamodule import build_eval_loader

    transform = build_eval_transform(data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                                     interpolation=data_config["interpolation"], dct_reduce=dct_reduce)
    return build_eval_loader(root, transform, batch_size=batch_size, num_workers=num_workers, split=split)


def eval_dct_reduce(ckpt: Mapping[str, Any]) -> bool:
    """The run's data.eval_dct_reduce: the pixels its validation used (standard ones for checkpoints predating the
    key: an export measures on those)."""
    return bool((ckpt["run_config"].get("data") or {}).get("eval_dct_reduce", False))


def default_out_dir(ckpt_path: Path) -> Path:
    """`<run dir>/export`: checkpoints live in `<run dir>/checkpoints/`."""
    return ckpt_path.resolve().parent.parent / "export"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description="Ship a checkpoint of `python -m train` (see train.export).")
    parser.add_argument("ckpt", type=Path, help="a checkpoint of `python -m train`")
    parser.add_argument("--out", type=Path, default=None, help="export dir (default: <run dir>/export)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="shard dir to evaluate on (default: the one recorded in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the evaluation runs (the ONNX check always runs on CPU)")
    parser.add_argument("--ptq", action="store_true",
                        help="also post-training int8 exports (model_int8.pte, model_int8.onnx) of a float checkpoint")
    parser.add_argument("--calib-batches", type=int, default=32, help="PTQ: training batches to calibrate on")
    parser.add_argument("--ptq-observer", choices=list(PTQ_OBSERVERS), default=None,
                        help="PTQ: how calibration sets activation ranges (default: the run's quant.ptq_observer)")
    parser.add_argument("--no-latency", dest="latency", action="store_const", const=False, default=None,
                        help="skip the batch-1 CPU latency figures (default: the run's export_latency and, for int8, "
                             "quant.latency)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipes.shards.metadata import DatasetError

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from train.quant.backend import QuantError

    int8 = None
    try:
        qat = bool(load_checkpoint(args.ckpt)["run_config"].get("qat"))
        if args.ptq or qat:
            report, int8 = export_quantized(args.ckpt, ptq=args.ptq, calib_batches=args.calib_batches,
                                            out_dir=args.out, data_root=args.data_root, batch_size=args.batch_size,
                                            num_workers=args.num_workers, latency=args.latency,
                                            ptq_observer=args.ptq_observer)
        else:
            report = export_checkpoint(args.ckpt, out_dir=args.out, data_root=args.data_root,
                                       batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                       latency=args.latency)
    except (ExportError, DatasetError, QuantError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = report.metrics
    print(f"exported {m['architecture']} to {report.out_dir}: top1 {m['top1']:.2f}% top5 {m['top5']:.2f}% on "
          f"{m['val_images']} val images; ONNX max |logit difference| {m['onnx_max_abs_diff']:.3g} "
          f"(bound {report.onnx_bound:.3g})")
    if int8 is not None:
        m = int8.metrics
        print(f"int8: ExecuTorch top1 {m['int8_pte_top1']:.2f}% (agreement {m['int8_pte_agreement']:.1f}%), "
              f"onnxruntime top1 {m['int8_onnx_top1']:.2f}% (agreement {m['int8_onnx_agreement']:.1f}%), "
              f"float {m['float_top1']:.2f}%")
        for failure in int8.failures:
            print(f"error: int8 export: {failure}", file=sys.stderr)
        if int8.failures:
            return 3
    return 0
