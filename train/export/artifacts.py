"""The export itself: a network -> safetensors weights, timm config, ONNX and metrics, checked, published atomically."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from data_pipes.errors import UserError
from train.export.tflite import export_tflite
from train.nets.evaluate import measure
from train.nets.files import (
    ARTIFACTS,
    CONFIG_FILE,
    DATA_CONFIG_KEYS,
    METRICS_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUT,
    TFLITE_FILE,
    WEIGHTS_FILE,
    quiet_onnx_exporter,
)
from train.nets.latency import latency_context, onnx_latencies
from train.nets.litert import tflite_latencies
from train.nets.load import LoadError, load_exported
from train.nets.normalize import normalize

log = logging.getLogger(__name__)

# fp32 re-association (onnxruntime fuses conv+BN and picks other conv/GEMM kernels) moves logits by ~1e-7..1e-5 of
# their scale over these 50-100 layer nets; an export bug (training-mode BN, wrong padding or attention scale) moves
# them by a sizeable fraction of it. 1e-3 of the largest |logit| sits two orders of magnitude from both.
ONNX_REL_TOL = 1e-3
# The ONNX check is about operator semantics, not statistics: a few dozen images suffice and bound the CPU time.
CHECK_IMAGES = 32
# Describe timm's own pretrained weights, which the exported weights are not.
SOURCE_WEIGHT_KEYS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


class ExportError(UserError, RuntimeError):
    """The export cannot be made or failed a check; the message says what to do."""


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    files: dict[str, Path]
    metrics: dict[str, Any]  # what metrics.json holds
    reload_max_abs_diff: float  # in-memory model vs the model timm rebuilt from the files
    logit_scale: float  # max |logit| on the check images, the unit of the ONNX bound
    onnx_bound: float  # the largest ONNX difference the check accepts


# ----------------------------------------------------------------------------------------------- library


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    architecture: str,
    label_names: Sequence[str],
    data_config: Mapping[str, Any],
    val_batches: Iterable[Mapping[str, Any]] | None,
    example_images: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    latency: bool,
    tflite: bool,
    record: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Write the four export files for `model` (whatever weights it holds: pass the EMA ones when EMA is on), and
    with `tflite` (and the litert extra) `model.tflite`, evaluated in LiteRT beside PyTorch (train.export.tflite).

    `data_config` is timm's resolved data config; it becomes the exported preprocessing. `val_batches` are batch
    dicts (`image` uint8 [B,3,H,W], `target`, `valid`) evaluated for metrics.json; None skips evaluation.
    `example_images` (uint8 [B,3,H,W]) are the ONNX check's input; by default the first validation batch's.
    `latency`: also measure the ONNX file's batch-1 CPU latency in onnxruntime (1 thread and all cores).
    `record`: more values for metrics.json (the run's provenance: train.provenance).
    """
    model = copy.deepcopy(model).cpu().float().eval()
    _check_arguments(model, label_names, data_config)
    batches, check_images = _check_input(val_batches, example_images)
    _check_image_size(check_images, data_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        stage = Path(tmp)
        _write_weights(model, stage / WEIGHTS_FILE)
        config = _write_config(model, stage / CONFIG_FILE, architecture, label_names, data_config)
        shipped = _rebuild(stage, architecture)
        mean, std = config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]
        x = normalize(check_images[:CHECK_IMAGES], mean, std)
        reload_diff, scale = _compare_reload(model, shipped, x)
        export_onnx(shipped, stage / ONNX_FILE, x)
        onnx_diff = check_onnx(stage / ONNX_FILE, shipped, x)
        lite = export_tflite(shipped, stage, x, architecture=architecture, rel_tol=ONNX_REL_TOL) if tflite else None
        runtimes = {"tflite": lite.runner} if lite is not None and lite.runner is not None else {}
        metrics = {"architecture": architecture, "num_classes": len(label_names)}
        metrics.update(evaluate(shipped.to(device), batches, mean=mean, std=std, runtimes=runtimes)
                       if batches is not None else {"top1": None, "top5": None, "val_images": 0})
        metrics.update(lite.metrics if lite is not None else {})
        # The export's own top-1 is always fp32 (whatever precision training validated in), on `device`.
        metrics["precision"] = "fp32"
        metrics["img_size"] = int(data_config["input_size"][-1])
        metrics["onnx_max_abs_diff"] = onnx_diff
        metrics["size_mb"] = {"safetensors": (stage / WEIGHTS_FILE).stat().st_size / 1e6,
                              "onnx": (stage / ONNX_FILE).stat().st_size / 1e6}
        if runtimes:
            metrics["size_mb"]["tflite"] = (stage / TFLITE_FILE).stat().st_size / 1e6
        if latency:
            metrics["latency_ms"] = onnx_latencies(stage / ONNX_FILE, metrics["img_size"])
            if runtimes:
                metrics["latency_ms"].update(tflite_latencies(stage / TFLITE_FILE, metrics["img_size"]))
            metrics["latency_context"] = latency_context()
        metrics.update(record or {})
        _write_json(stage / METRICS_FILE, metrics)
        files = _publish(stage, out_dir)
    lite_text = (f"; LiteRT top-1 {_pct(metrics['tflite_top1'])}, agreement {_pct(metrics['tflite_agreement'])}%"
                 if "tflite_top1" in metrics else "")
    log.info("export: %s -> %s (top-1 %s, top-5 %s on %d images; ONNX max |dlogit| %.3g%s)", architecture, out_dir,
             _pct(metrics["top1"]), _pct(metrics["top5"]), metrics["val_images"], onnx_diff, lite_text)
    return ExportReport(out_dir=out_dir, files=files, metrics=metrics, reload_max_abs_diff=reload_diff,
                        logit_scale=scale, onnx_bound=ONNX_REL_TOL * scale)


def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, mean: Sequence[float], std: Sequence[float],
    runtimes: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """top1/top5 in percent over the valid samples of `batches`, and how many there were; for each of `runtimes`
    (the same network in another runtime, e.g. `tflite`), `<name>_top1`, `_top5`, and its `_agreement` (% of
    images with the same top-1) and `_max_abs_diff` (largest |logit difference|) against `model`, in the same pass."""
    device = next(model.parameters()).device
    models = {"model": lambda x: model(x.to(device, non_blocking=True)), **(runtimes or {})}
    try:
        results = measure(models, "model", batches, mean=mean, std=std, num_classes=model.num_classes)
    except UserError as e:
        raise ExportError(str(e)) from None
    out: dict[str, Any] = {"top1": results["model"]["top1"], "top5": results["model"]["top5"],
                           "val_images": results["model"]["images"]}
    for name in runtimes or {}:
        r = results[name]
        out.update({f"{name}_top1": r["top1"], f"{name}_top5": r["top5"], f"{name}_agreement": r["agree"],
                    f"{name}_max_abs_diff": r["max_diff"]})
    return out


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """torch.onnx (dynamo) export with a dynamic batch axis, weights inside the one file."""
    # torch.export specialises a size-1 dim to a constant, so trace with two images to keep the batch axis free.
    sample = example[:2] if example.size(0) >= 2 else example.expand(2, -1, -1, -1).contiguous()
    with quiet_onnx_exporter():
        program = torch.onnx.export(model, (sample,), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                    opset_version=ONNX_OPSET, dynamic_shapes=({0: "batch"},), dynamo=True,
                                    verbose=False)
        program.save(str(path), external_data=False)


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor) -> float:
    """Max |logit| difference between onnxruntime and PyTorch on `x`; raises past ONNX_REL_TOL of the logit scale."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(x.numpy())})[0]
    with torch.inference_mode():
        ref = model(x).numpy()
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    bound = ONNX_REL_TOL * scale
    log.debug("ONNX check on %d images: max |logit difference| %.3g (logit scale %.3g, bound %.3g)",
             x.size(0), diff, scale, bound)
    if not diff <= bound:  # also catches NaN
        raise ExportError(f"{path.name} disagrees with PyTorch: max |logit difference| {diff:.3g} exceeds "
                          f"{ONNX_REL_TOL:g} x logit scale {scale:.3g} = {bound:.3g}; the ONNX graph is wrong")
    return diff


def _check_arguments(model: nn.Module, label_names: Sequence[str], data_config: Mapping[str, Any]) -> None:
    missing = [k for k in DATA_CONFIG_KEYS if k not in data_config]
    if missing:
        raise ExportError(f"data_config lacks {', '.join(missing)}: pass timm's resolved data config "
                          f"(timm.data.resolve_model_data_config)")
    num_classes = getattr(model, "num_classes", None)
    if num_classes != len(label_names):
        raise ExportError(f"the model has {num_classes} classes but {len(label_names)} label names were given")


def _check_input(
    val_batches: Iterable[Mapping[str, Any]] | None, example_images: torch.Tensor | None
) -> tuple[Iterator[Mapping[str, Any]] | None, torch.Tensor]:
    """The batches to evaluate (first one put back) and the images of the ONNX check."""
    if val_batches is None:
        if example_images is None:
            raise ExportError("the ONNX check needs real images: pass val_batches or example_images")
        return None, example_images
    iterator = iter(val_batches)
    first = next(iterator, None)
    if first is None:
        raise ExportError("val_batches is empty: check the val split of the data root")
    images = example_images if example_images is not None else first["image"]
    return itertools.chain([first], iterator), images


def _check_image_size(images: torch.Tensor, data_config: Mapping[str, Any]) -> None:
    expected = tuple(data_config["input_size"])
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ExportError(f"images are {tuple(images.shape)} but data_config input_size is {expected}: "
                          f"build the eval transform from the same data_config")


def _write_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # `format: pt` is what Hugging Face loaders look for in safetensors metadata.
    save_file(state, str(path), metadata={"format": "pt"})


def _write_config(
    model: nn.Module, path: Path, architecture: str, label_names: Sequence[str], data_config: Mapping[str, Any]
) -> dict[str, Any]:
    """timm's own config.json, with the preprocessing taken from `data_config` and nothing of timm's weights."""
    preprocessing = {k: _plain(data_config[k]) for k in (*DATA_CONFIG_KEYS, "crop_mode") if k in data_config}
    # Older timm (< 1.0.31) takes neither `data_config` nor a str path: the preprocessing is set just below.
    save_config_for_hf(model, Path(path), model_config={"label_names": list(label_names)})
    config = json.loads(path.read_text())
    config["architecture"] = architecture
    pretrained_cfg = config["pretrained_cfg"]
    for key in SOURCE_WEIGHT_KEYS:
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(preprocessing, num_classes=len(label_names))
    _write_json(path, config)
    return config


def _rebuild(stage: Path, architecture: str) -> nn.Module:
    try:
        return load_exported(stage)
    except (RuntimeError, LoadError) as e:
        raise ExportError(f"timm cannot rebuild {architecture} from the exported files ({e}); pass the plain timm "
                          f"network, not a wrapped (QAT, compiled) one, under its own timm name") from None


def _compare_reload(model: nn.Module, shipped: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """The files must reproduce the network that was passed in; returns (max |difference|, logit scale)."""
    with torch.inference_mode():
        ref, got = model(x), shipped(x)
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    if not diff <= ONNX_REL_TOL * scale:
        raise ExportError(f"the model rebuilt from {WEIGHTS_FILE} + {CONFIG_FILE} differs from the one exported "
                          f"(max |logit difference| {diff:.3g}, logit scale {scale:.3g}): is the architecture name "
                          f"the network's own?")
    return diff, scale


def _publish(stage: Path, out_dir: Path) -> dict[str, Path]:
    """Move the checked files into place, one atomic rename each, metrics.json last. A model.tflite of an earlier
    export that this one could not make is removed (metrics.json says why), so every file matches metrics.json."""
    files = {}
    mode = _file_mode()
    if not (stage / TFLITE_FILE).is_file():
        (out_dir / TFLITE_FILE).unlink(missing_ok=True)
    for name in (*ARTIFACTS[:-1], TFLITE_FILE, ARTIFACTS[-1]):
        if name == TFLITE_FILE and not (stage / name).is_file():
            continue
        # safetensors writes owner-only files; shipped files get what any new file of this user gets.
        os.chmod(stage / name, mode)
        os.replace(stage / name, out_dir / name)
        files[name] = out_dir / name
    return files


def _file_mode() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _pct(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)
