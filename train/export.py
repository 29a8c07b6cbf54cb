"""Ship a trained network: `<out>/{model.safetensors,config.json,model.onnx,metrics.json}`.

    python -m train.export RUN_DIR/checkpoints/last.ckpt [--out DIR] [--data-root DIR] [--batch-size B]

config.json is timm's own Hugging Face layout (written by `timm.models._hub.save_config_for_hf`), so the trained
model comes back with timm alone, classifier included:

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(architecture, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors", num_classes=N))

`metrics.json` is measured on a model rebuilt from the written files (that same user path), not on the module in
memory, so it describes exactly what ships. Everything is staged in a private folder and moved into place only once
every check passed: a failed export leaves a previous export untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
METRICS_FILE = "metrics.json"
# Written last: its presence in an export dir means the other three files are complete and checked.
ARTIFACTS = (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE, METRICS_FILE)

# torchlib's native opset (no version-conversion pass); run by onnxruntime >= 1.14 and TensorRT >= 8.6.
ONNX_OPSET = 18
# fp32 re-association (onnxruntime fuses conv+BN and picks other conv/GEMM kernels) moves logits by ~1e-7..1e-5 of
# their scale over these 50-100 layer nets; an export bug (training-mode BN, wrong padding or attention scale) moves
# them by a sizeable fraction of it. 1e-3 of the largest |logit| sits two orders of magnitude from both.
ONNX_REL_TOL = 1e-3
# The ONNX check is about operator semantics, not statistics: a few dozen images suffice and bound the CPU time.
CHECK_IMAGES = 32
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"

DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")
# Describe timm's own pretrained weights, which the exported weights are not.
SOURCE_WEIGHT_KEYS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")
CHECKPOINT_KEYS = ("state_dict", "run_config", "dataset", "data_config")
NETWORK_PREFIX = "model."
TRAIN_HINT = "`python -m train` (it writes <run dir>/checkpoints/last.ckpt and best.ckpt)"


class ExportError(RuntimeError):
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
) -> ExportReport:
    """Write the four export files for `model` (whatever weights it holds: pass the EMA ones when EMA is on).

    `data_config` is timm's resolved data config; it becomes the exported preprocessing. `val_batches` are batch
    dicts (`image` uint8 [B,3,H,W], `target`, `valid`) evaluated for metrics.json; None skips evaluation.
    `example_images` (uint8 [B,3,H,W]) are the ONNX check's input; by default the first validation batch's.
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
        metrics = {"architecture": architecture, "num_classes": len(label_names)}
        metrics.update(evaluate(shipped.to(device), batches, mean=mean, std=std) if batches is not None else
                       {"top1": None, "top5": None, "val_images": 0})
        metrics["onnx_max_abs_diff"] = onnx_diff
        _write_json(stage / METRICS_FILE, metrics)
        files = _publish(stage, out_dir)
    log.info("export: %s -> %s (top1 %s, top5 %s on %d images; ONNX max |dlogit| %.3g)", architecture, out_dir,
             metrics["top1"], metrics["top5"], metrics["val_images"], onnx_diff)
    return ExportReport(out_dir=out_dir, files=files, metrics=metrics, reload_max_abs_diff=reload_diff,
                        logit_scale=scale, onnx_bound=ONNX_REL_TOL * scale)


def load_exported(export_dir: str | os.PathLike) -> nn.Module:
    """The model of an export dir, rebuilt the way a user would: timm + the dir's config.json and weights."""
    import timm

    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    architecture, num_classes = config["architecture"], config["num_classes"]
    _ensure_registered(architecture)
    # The whole exported pretrained_cfg rides along, so the rebuilt model resolves our preprocessing, not timm's.
    overlay = dict(config["pretrained_cfg"], file=str(export_dir / WEIGHTS_FILE), num_classes=num_classes)
    kwargs = dict(config.get("model_args", {}), num_classes=num_classes)
    return timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float, the same arithmetic as training: /255 then (x - mean) / std."""
    if images.dtype != torch.uint8:
        raise ExportError(f"images must be uint8 [B,3,H,W] as the loaders make them, got {images.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """top1/top5 in percent over the valid samples of `batches`, and how many there were."""
    device = next(model.parameters()).device
    k = min(5, model.num_classes)
    hits1 = hits5 = seen = 0
    with torch.inference_mode():
        for batch in batches:
            valid = batch["valid"].to(torch.bool)
            if not valid.any():
                continue
            images = batch["image"][valid].to(device, non_blocking=True)
            target = batch["target"][valid].to(device, non_blocking=True)
            top = model(normalize(images, mean, std)).topk(k, dim=1).indices
            hit = top == target[:, None]
            hits1 += int(hit[:, 0].sum())
            hits5 += int(hit.any(dim=1).sum())
            seen += int(valid.sum())
    if seen == 0:
        raise ExportError("the validation batches held no valid image: check the val split of the data root")
    return {"top1": 100.0 * hits1 / seen, "top5": 100.0 * hits5 / seen, "val_images": seen}


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """torch.onnx (dynamo) export with a dynamic batch axis, weights inside the one file."""
    # torch.export specialises a size-1 dim to a constant, so trace with two images to keep the batch axis free.
    sample = example[:2] if example.size(0) >= 2 else example.expand(2, -1, -1, -1).contiguous()
    with _quiet("onnxscript", "onnx_ir"):
        program = torch.onnx.export(model, (sample,), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                    opset_version=ONNX_OPSET, dynamic_shapes=({0: "batch"},), dynamo=True,
                                    verbose=False)
        program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Keep the exporter's per-pass INFO chatter (hundreds of lines) out of training logs."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor) -> float:
    """Max |logit| difference between onnxruntime and PyTorch on `x`; raises past ONNX_REL_TOL of the logit scale."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(x.numpy())})[0]
    with torch.inference_mode():
        ref = model(x).numpy()
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    bound = ONNX_REL_TOL * scale
    log.info("ONNX check on %d images: max |logit difference| %.3g (logit scale %.3g, bound %.3g)",
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
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # `format: pt` is what Hugging Face loaders look for in safetensors metadata.
    save_file(state, str(path), metadata={"format": "pt"})


def _write_config(
    model: nn.Module, path: Path, architecture: str, label_names: Sequence[str], data_config: Mapping[str, Any]
) -> dict[str, Any]:
    """timm's own config.json, with the preprocessing taken from `data_config` and nothing of timm's weights."""
    from timm.models._hub import save_config_for_hf

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
    except RuntimeError as e:
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
    """Move the checked files into place, one atomic rename each, metrics.json last."""
    files = {}
    mode = _file_mode()
    for name in ARTIFACTS:
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


def _ensure_registered(architecture: str) -> None:
    import timm

    if not timm.is_model(architecture):
        # Variants timm lacks are registered with timm by importing our model module.
        import train.models  # noqa: F401
    if not timm.is_model(architecture):
        raise ExportError(f"unknown model {architecture!r}: neither timm nor train.models registers it")


# ----------------------------------------------------------------------------------------------- checkpoint CLI


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 4,
    device: str | torch.device = "cpu",
) -> ExportReport:
    """Export a checkpoint of `python -m train`, evaluated on the val split of its (or the given) shard dir."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    name = ckpt["run_config"]["model"]["name"]
    label_names = list(ckpt["dataset"]["label_names"])
    model = build_network(name, len(label_names), network_state(ckpt["state_dict"]))
    root = resolve_data_root(data_root, ckpt)
    _check_labels(root, label_names)
    loader = build_val_loader(root, ckpt["data_config"], batch_size=batch_size, num_workers=num_workers)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_path)
    return export_model(model, out, architecture=name, label_names=label_names, data_config=ckpt["data_config"],
                        val_batches=loader, device=device)


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
    from data_pipes.metadata import read_info

    shards = list(read_info(root, check_files=False).label_names)
    if shards != list(label_names):
        common = min(len(shards), len(label_names))
        first = next((i for i, (a, b) in enumerate(zip(shards, label_names)) if a != b), common)
        raise ExportError(f"the shards at {root} have {len(shards)} classes, the checkpoint {len(label_names)}, "
                          f"first difference at index {first}: pass the --data-root the model was trained with")


def build_val_loader(root: Path, data_config: Mapping[str, Any], *, batch_size: int, num_workers: int) -> Iterable:
    from data_pipes.augment import build_eval_transform
    from data_pipes.datamodule import build_eval_loader

    transform = build_eval_transform(data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                                     interpolation=data_config["interpolation"])
    return build_eval_loader(root, transform, batch_size=batch_size, num_workers=num_workers, split="val")


def default_out_dir(ckpt_path: Path) -> Path:
    """`<run dir>/export`: checkpoints live in `<run dir>/checkpoints/`."""
    return ckpt_path.resolve().parent.parent / "export"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint of `python -m train`")
    parser.add_argument("--out", type=Path, default=None, help="export dir (default: <run dir>/export)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="shard dir to evaluate on (default: the one recorded in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the evaluation runs (the ONNX check always runs on CPU)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipes.metadata import DatasetError

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = export_checkpoint(args.ckpt, out_dir=args.out, data_root=args.data_root, batch_size=args.batch_size,
                                   num_workers=args.num_workers, device=args.device)
    except (ExportError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = report.metrics
    print(f"exported {m['architecture']} to {report.out_dir}: top1 {m['top1']:.2f}% top5 {m['top5']:.2f}% on "
          f"{m['val_images']} val images; ONNX max |logit difference| {m['onnx_max_abs_diff']:.3g} "
          f"(bound {report.onnx_bound:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
