"""The teacher: loaded from an export directory or checkpoint of ours, or a timm name with a local weights file.

It is frozen (no gradients, eval mode) and deliberately *not* an `nn.Module` attribute of anything trained: a
plain holder keeps it out of the student's `state_dict` (so out of every checkpoint), out of the EMA copy (a deep
copy of the holder is the holder itself) and out of Lightning's train/eval switching and DDP's parameter lists.
It has its own data config (resolution, mean/std, interpolation, crop) from its export's `config.json`, its
checkpoint, or timm (`train.nets.load`, the loader every trained network of the project goes through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from data_pipes.errors import UserError
from data_pipes.launch import local_device_index
from train.nets.compiled import compile_network
from train.nets.load import LoadError, Settings, load_network
from train.nets.normalize import normalize_images, pixel_stats

TEACHER = Settings("kd.teacher", weights="kd.teacher_weights", labels="kd.teacher_labels")
SELECTOR = Settings("kd.sources.d3.selector", weights="kd.sources.d3.selector_weights", labels="kd.teacher_labels")


class TeacherError(UserError, ValueError):
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
        self._mean, self._std = pixel_stats(self.data_config["mean"], self.data_config["std"])

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

    def compile(self, mode: str) -> Teacher:
        """Run the network compiled by torch.compile (in place: its weights and identity are unchanged)."""
        compile_network(self.model, mode)
        return self

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, S, S] at the teacher's resolution -> float logits (normalised with its own mean/std)."""
        if self.model.training:  # nothing should switch it, but a frozen teacher in train mode would move its BN
            self.model.eval()
        x = normalize_images(images, self._mean, self._std, torch.channels_last)
        return self.model(x).float()

    @torch.no_grad()
    def probabilities(self, images: Tensor, temperature: float = 1.0) -> Tensor:
        """softmax(logits / T) over the classes, in fp32: the network may run under bf16 autocast, the distribution
        it is distilled into (and stored as top-k probabilities) is always computed from fp32 logits."""
        logits = self.logits(images)
        with torch.autocast(logits.device.type, enabled=False):
            return torch.softmax(logits.float() / temperature, dim=1)

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


def load_teacher(spec: str | None, *, settings: Settings = TEACHER, weights: str | None = None,
                 labels: str | None = None, num_classes: int | None = None) -> Teacher:
    """`spec`: an export directory (config.json + model.safetensors), a checkpoint of `python -m train`, or a timm
    model name with `weights` (a local .safetensors / .pth file; nothing is downloaded), loaded by the model layer's
    one loader (`train.nets.load`). `settings` name the config keys, for messages (the teacher's or D3's selector)."""
    if not spec:
        raise TeacherError(f"distill=true needs a teacher: set {settings.spec}=<export dir | checkpoint | timm name> "
                           f"(a timm name also needs {settings.weights}=<local weights file>)")
    try:
        net = load_network(spec, settings=settings, weights=weights, labels=labels, num_classes=num_classes)
    except LoadError as e:
        raise TeacherError(str(e)) from None
    return Teacher(net.model, net.label_names, net.data_config, net.source, net.architecture, net.weights_sha256)


def resolve_device(name: str) -> torch.device:
    """kd.build.device: `auto` is this process's GPU when there is one, else the CPU; `cuda` (no index) is this
    process's GPU too. Each process of a launch (torchrun workers, srun tasks) drives its own: its index on the node
    among the GPUs it sees (one bound task sees only its own), and it is made the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_device_index(torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def release(teacher: Teacher) -> None:
    """Give back the device memory a network used before training (the training run puts its teacher on the
    training device itself)."""
    on_gpu = next(teacher.model.parameters()).is_cuda
    teacher.to("cpu")
    if on_gpu:
        torch.cuda.empty_cache()


def autocast_bf16(device: torch.device, precision: str) -> bool:
    """kd.build.precision: `auto` (or `bf16`) runs the teacher under bf16 autocast on a GPU that has it."""
    return device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
