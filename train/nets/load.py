"""The one loader of trained networks: an export directory, a checkpoint of ours, or a timm name + local weights.

    load_network(spec) -> TrainedNetwork(model, label_names, data_config, architecture, source, weights_sha256, ...)

The teacher of a distillation run, D3's selector, QAT's `init_from` and `python -m train.export` all load through it,
so what counts as "a network of ours" and every check on it (safe loading, the keys a checkpoint must hold, whether
the weights fit the architecture) is written once. Checkpoints are read with `torch.load(weights_only=True)`: a file
that holds pickled Python objects is refused, never run. Nothing is downloaded: a timm name needs a local file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import ImageNetInfo, resolve_model_data_config
from torch import nn

from data_pipes.errors import UserError
from train.nets.files import (
    CHECKPOINT_KEYS,
    CONFIG_FILE,
    DATA_CONFIG_KEYS,
    NETWORK_PREFIX,
    TRAIN_HINT,
    WEIGHTS_FILE,
)
from train.nets.registry import UnknownModelError, create_model


class LoadError(UserError, ValueError):
    """A trained network that cannot be loaded: missing, not ours, unsafe, or not fitting its architecture."""


@dataclass(frozen=True)
class Settings:
    """The config keys a network is given by, for messages that say what to change."""

    spec: str  # e.g. "kd.teacher"
    weights: str | None = None  # a timm name's local weights file, e.g. "kd.teacher_weights"; None: no timm names
    labels: str | None = None  # a timm name's class names file, e.g. "kd.teacher_labels"


@dataclass(eq=False)
class TrainedNetwork:
    """A trained network, in eval mode, with what it was trained on and where it came from."""

    model: nn.Module
    label_names: tuple[str, ...]
    data_config: dict[str, Any]  # DATA_CONFIG_KEYS: its resolution, mean/std, crop and interpolation
    architecture: str  # the timm name
    source: str  # what was given (a path or the timm name)
    weights_sha256: str  # of the weights file (export, timm) or of the whole checkpoint
    kind: str  # "export" | "checkpoint" | "timm"
    checkpoint: dict[str, Any] | None = None  # a checkpoint's plain data (run_config, provenance, ...)


def load_network(spec: str | os.PathLike, *, settings: Settings, weights: str | None = None,
                 labels: str | None = None, num_classes: int | None = None) -> TrainedNetwork:
    """`spec`: an export directory (config.json + model.safetensors), a checkpoint of `python -m train`, or a timm
    model name with `weights` (a local .safetensors / .pth file) and its class names (`labels`, a file of one name a
    line; a 1000-class network without one is taken to be ImageNet-1k's)."""
    path = Path(str(spec)).expanduser()
    try:
        if path.is_dir():
            return _from_export(path)
        if path.is_file():
            return _from_checkpoint(path)
    except LoadError as e:
        raise LoadError(f"{settings.spec}={spec}: {e}") from None
    if path.suffix or "/" in str(spec):
        raise LoadError(f"{settings.spec}={spec}: no such export directory or checkpoint")
    return _from_timm(str(spec), weights, labels, num_classes, settings)


def load_exported(export_dir: str | os.PathLike) -> nn.Module:
    """The model of an export dir, rebuilt the way a user would: timm + the dir's config.json and weights."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    architecture, num_classes = config["architecture"], config["num_classes"]
    if not timm.is_model(architecture):
        raise LoadError(f"unknown model {architecture!r}: neither timm nor train.nets registers it")
    # The whole exported pretrained_cfg rides along, so the rebuilt model resolves our preprocessing, not timm's.
    overlay = dict(config["pretrained_cfg"], file=str(export_dir / WEIGHTS_FILE), num_classes=num_classes)
    kwargs = dict(config.get("model_args", {}), num_classes=num_classes)
    return timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of `python -m train` as plain data (never unpickling code), with the keys a network needs."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        ckpts = path.parent / "checkpoints"
        raise LoadError(f"{path} is an export directory, not a checkpoint: it is what an export writes. Export a "
                        f"checkpoint again with: python -m train.export "
                        f"{ckpts / 'last.ckpt' if ckpts.is_dir() else '<run dir>/checkpoints/last.ckpt'}")
    if path.is_dir() and (path / "checkpoints").is_dir():
        raise LoadError(f"{path} is a run directory, not a checkpoint: export one of its checkpoints, e.g. python -m "
                        f"train.export {path / 'checkpoints' / 'last.ckpt'} (or best.ckpt)")
    if path.is_dir():
        held = sorted(p.name for p in path.glob("*.ckpt"))
        raise LoadError(f"{path} is a directory, not a checkpoint" + (f": it holds {', '.join(held[:4])}; name one"
                                                                        if held else f"; checkpoints are written by "
                                                                        f"{TRAIN_HINT}"))
    if not path.is_file():
        raise LoadError(f"checkpoint {path} does not exist; checkpoints are written by {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise LoadError(f"{path} is not a PyTorch checkpoint; use one written by {TRAIN_HINT}") from None
        raise LoadError(f"refusing {path}: it holds a pickled Python object ({found.group(1)}), which safe loading "
                        f"(torch.load weights_only=True) does not run. Checkpoints of this project hold only "
                        f"tensors and plain values; use one written by {TRAIN_HINT}") from None
    except (RuntimeError, EOFError) as e:
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({e}); use one written by {TRAIN_HINT}") from None
    missing = _missing_keys(ckpt) if isinstance(ckpt, dict) else [f"everything (it holds a {type(ckpt).__name__})"]
    if missing:
        raise LoadError(f"{path} is not a checkpoint of this project's training: it lacks {', '.join(missing)}. "
                        f"Use a checkpoint written by {TRAIN_HINT}")
    return ckpt


def network_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights from a LightningModule state_dict (`model.` prefix; EMA weights when EMA was on)."""
    # torch.compile wraps the network as `_orig_mod`; its weights are the plain network's.
    state = {k[len(NETWORK_PREFIX):].replace("_orig_mod.", ""): v for k, v in state_dict.items()
             if k.startswith(NETWORK_PREFIX)}
    if not state:
        raise LoadError(f"the checkpoint's state_dict has no '{NETWORK_PREFIX}*' keys (the network's weights); "
                        f"use a checkpoint written by {TRAIN_HINT}")
    return state


def build_network(name: str, num_classes: int, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A fresh `name` with `num_classes` outputs holding exactly `state` (strict), in eval mode."""
    try:
        model = create_model(name, num_classes=num_classes)
    except UnknownModelError as e:
        raise LoadError(f"the checkpoint's model: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"the checkpoint's weights do not fit {name} with {num_classes} classes: {e}") from None
    return model.eval()


def checkpoint_network(ckpt: Mapping[str, Any]) -> nn.Module:
    """The float network of a `read_checkpoint` result (not of a QAT checkpoint: its network is fake-quantized)."""
    name, labels = ckpt["run_config"]["model"]["name"], ckpt["dataset"]["label_names"]
    return build_network(name, len(labels), network_state(ckpt["state_dict"]))


def network_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments the checkpoint's network was created with besides its classes (dropout and stochastic-depth
    rates); checkpoints that predate the record: the run's model group, which is what a run built unless a feature
    (distillation's kd.drop_rate) set its own."""
    if "network_args" in ckpt:
        return dict(ckpt["network_args"])
    model = ckpt["run_config"].get("model") or {}
    return {k: model[k] for k in ("drop_rate", "drop_path_rate") if model.get(k) is not None}


def is_qat_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    return bool(ckpt["run_config"].get("qat"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_config_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The DATA_CONFIG_KEYS of a data config or pretrained_cfg, as plain JSON values (tuples become lists)."""
    return {k: list(config[k]) if isinstance(config[k], (tuple, list)) else config[k] for k in DATA_CONFIG_KEYS}


def _from_export(directory: Path) -> TrainedNetwork:
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not (config_file.is_file() and weights_file.is_file()):
        raise LoadError(f"it is not an export directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE}, as "
                        f"`python -m train` writes to <run dir>/export)")
    try:
        config = json.loads(config_file.read_text())
        model = load_exported(directory)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LoadError(f"cannot load the export: {e}") from None
    return TrainedNetwork(model, tuple(config.get("label_names") or []), data_config_of(config["pretrained_cfg"]),
                          config["architecture"], str(directory), sha256_file(weights_file), "export")


def _from_checkpoint(path: Path) -> TrainedNetwork:
    ckpt = read_checkpoint(path)
    if is_qat_checkpoint(ckpt):
        raise LoadError(f"it is a QAT checkpoint (a fake-quantized network): use its float export, or export it "
                        f"first (python -m train.export {path})")
    return TrainedNetwork(checkpoint_network(ckpt), tuple(ckpt["dataset"]["label_names"]),
                          data_config_of(ckpt["data_config"]), ckpt["run_config"]["model"]["name"], str(path),
                          sha256_file(path), "checkpoint", ckpt)


def _from_timm(name: str, weights: str | None, labels: str | None, num_classes: int | None,
               settings: Settings) -> TrainedNetwork:
    if settings.weights is None:
        raise LoadError(f"{settings.spec}={name}: no such export directory or checkpoint of ours")
    if not timm.is_model(name):
        raise LoadError(f"{settings.spec}={name} is neither an export directory, a checkpoint nor a timm model name")
    if not weights or not Path(weights).is_file():
        raise LoadError(f"{settings.spec}={name} is a timm name: set {settings.weights} to a local weights file "
                        f"(nothing is downloaded); got {weights!r}")
    if labels:
        names = tuple(line.strip() for line in Path(labels).read_text().splitlines() if line.strip())
    elif num_classes == 1000:
        names = tuple(ImageNetInfo().label_names())
    else:
        raise LoadError(f"{settings.spec}={name}: set {settings.labels} to a file of its class names, one per line "
                        "(only 1000-class networks are assumed to use ImageNet-1k's synsets)")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=len(names),
                                  pretrained_cfg_overlay=dict(file=str(weights), num_classes=len(names)))
    except (RuntimeError, ValueError, OSError) as e:
        raise LoadError(f"{settings.spec}={name}: cannot load {weights} into it with {len(names)} classes: {e}") \
            from None
    return TrainedNetwork(model.eval(), names, data_config_of(resolve_model_data_config(model)), name, name,
                          sha256_file(Path(weights)), "timm")


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
