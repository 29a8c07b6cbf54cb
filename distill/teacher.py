"""The teacher: loaded from an export directory or checkpoint of ours, or a timm name with a local weights file.

It is frozen (no gradients, eval mode) and deliberately *not* an `nn.Module` attribute of anything trained: a
plain holder keeps it out of the student's `state_dict` (so out of every checkpoint), out of the EMA copy (a deep
copy of the holder is the holder itself) and out of Lightning's train/eval switching and DDP's parameter lists.
It has its own data config (resolution, mean/std, interpolation, crop) from its export's `config.json`, its
checkpoint, or timm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from train.normalize import normalize_images

DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


class TeacherError(ValueError):
    """A teacher that cannot be loaded or does not fit the data; the message names the fix."""


@dataclass(eq=False)
class Teacher:
    model: nn.Module
    label_names: tuple[str, ...]
    data_config: dict[str, Any]
    source: str
    architecture: str
    weights_sha256: str

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self._mean = torch.tensor(self.data_config["mean"]) * 255
        self._std = torch.tensor(self.data_config["std"]) * 255

    def __deepcopy__(self, memo: dict) -> Teacher:
        return self  # EMA and other copies of the student share the one frozen teacher

    @property
    def img_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    @property
    def interpolation(self) -> str:
        return str(self.data_config["interpolation"])

    @property
    def identity(self) -> dict[str, Any]:
        """What a kd set's manifest records, and what training checks a set against."""
        return {"source": self.source, "architecture": self.architecture, "weights_sha256": self.weights_sha256,
                "num_classes": len(self.label_names), "data_config": self.data_config}

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device=device, memory_format=torch.channels_last)
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, S, S] at the teacher's resolution -> float logits (normalised with its own mean/std)."""
        if self.model.training:  # nothing should switch it, but a frozen teacher in train mode would move its BN
            self.model.eval()
        x = normalize_images(images, self._mean, self._std, torch.channels_last)
        return self.model(x).float()

    def check_classes(self, label_names: tuple[str, ...], what: str) -> None:
        mine, theirs = list(self.label_names), list(label_names)
        if mine == theirs:
            return
        if len(mine) != len(theirs):
            raise TeacherError(f"the teacher {self.source} predicts {len(mine)} classes but {what} has "
                               f"{len(theirs)}: distil from a teacher trained on the same classes")
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise TeacherError(f"the teacher {self.source} has other class names than {what}: index {first} is "
                           f"{mine[first]!r} for the teacher and {theirs[first]!r} there. Its classes must be the "
                           f"data's, in the same order")


def load_teacher(spec: str | None, *, weights: str | None = None, labels: str | None = None,
                 num_classes: int | None = None) -> Teacher:
    """`spec`: an export directory (config.json + model.safetensors), a checkpoint of `python -m train`, or a timm
    model name with `weights` (a local .safetensors / .pth file; nothing is downloaded)."""
    if not spec:
        raise TeacherError("distill=true needs a teacher: set kd.teacher=<export dir | checkpoint | timm name> "
                           "(a timm name also needs kd.teacher_weights=<local weights file>)")
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return _from_export(path)
    if path.is_file():
        return _from_checkpoint(path)
    if path.suffix or "/" in str(spec):
        raise TeacherError(f"kd.teacher={spec}: no such export directory or checkpoint")
    return _from_timm(str(spec), weights, labels, num_classes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_export(directory: Path) -> Teacher:
    from train.export import load_exported

    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        raise TeacherError(f"kd.teacher={directory} is not an export directory (it needs config.json and "
                           f"model.safetensors, as `python -m train` writes to <run dir>/export)")
    try:
        config = json.loads(config_file.read_text())
        model = load_exported(directory)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise TeacherError(f"cannot load the teacher export {directory}: {e}") from None
    names = config.get("label_names") or []
    cfg = config["pretrained_cfg"]
    return Teacher(model, tuple(names), {k: _plain(cfg[k]) for k in DATA_KEYS}, str(directory),
                   config["architecture"], _sha256(weights_file))


def _from_checkpoint(path: Path) -> Teacher:
    from train.export import ExportError, load_checkpoint
    from train.export.checkpoint import build_network, network_state

    try:
        ckpt = load_checkpoint(path)
        names = tuple(ckpt["dataset"]["label_names"])
        architecture = ckpt["run_config"]["model"]["name"]
        model = build_network(architecture, len(names), network_state(ckpt["state_dict"]))
    except ExportError as e:
        raise TeacherError(f"kd.teacher={path}: {e}") from None
    return Teacher(model, names, {k: _plain(ckpt["data_config"][k]) for k in DATA_KEYS}, str(path), architecture,
                   _sha256(path))


def _from_timm(name: str, weights: str | None, labels: str | None, num_classes: int | None) -> Teacher:
    import timm
    from timm.data import ImageNetInfo, resolve_model_data_config

    import train.models  # noqa: F401 - registers the variants timm lacks

    if not timm.is_model(name):
        raise TeacherError(f"kd.teacher={name} is neither an export directory, a checkpoint nor a timm model name")
    if not weights or not Path(weights).is_file():
        raise TeacherError(f"kd.teacher={name} is a timm name: set kd.teacher_weights to a local weights file "
                           f"(nothing is downloaded); got {weights!r}")
    if labels:
        names = tuple(line.strip() for line in Path(labels).read_text().splitlines() if line.strip())
    elif num_classes == 1000:
        names = tuple(ImageNetInfo().label_names())
    else:
        raise TeacherError(f"kd.teacher={name}: set kd.teacher_labels to a file of its class names, one per line "
                           "(only 1000-class teachers are assumed to use ImageNet-1k's synsets)")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=len(names),
                                  pretrained_cfg_overlay=dict(file=str(weights), num_classes=len(names)))
    except (RuntimeError, ValueError, OSError) as e:
        raise TeacherError(f"cannot load {weights} into {name} with {len(names)} classes: {e}") from None
    data_config = resolve_model_data_config(model)
    return Teacher(model, names, {k: _plain(data_config[k]) for k in DATA_KEYS}, name, name, _sha256(Path(weights)))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value
