"""Input sizes: whether a network can take an image size, and which sizes it can.

`check_img_size` runs before any data is read, so a size the network cannot take is a one-line error naming the
sizes that work, not a shape error deep in the first training step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from train.nets.registry import ModelConfigError

# Probed when a size fails, to tell the user which sizes do work.
_PROBE_SIZES = tuple(range(32, 513, 32))
# Errors a forward pass raises for an input shape the network cannot take (shape asserts, size mismatches).
_SHAPE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError)



def check_img_size(model: nn.Module, img_size: int) -> None:
    """Raise ModelConfigError (a ValueError) naming the sizes that work, when `model` cannot take this size.

    Two checks. The size must reach the network's total stride: timm MobileNets *run* at any size >= 1 (padding
    keeps every stride-2 layer alive), but below the stride (32) the deepest stages only ever see a 1x1 map.
    And a forward pass must succeed: other timm models need exact sizes (ViT: its patch grid; LeViT: its
    attention biases). The pass runs on the meta device (shapes only, no compute, the model left untouched),
    confirmed on the real device only if the meta pass fails (some models keep tensors outside their buffers).
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ModelConfigError(f"img_size must be a positive int (pixels per side), got {img_size!r}: "
                               "set data.img_size=<int>, e.g. data.img_size=224")
    _check_stride(model, img_size)
    error = _forward_error(model, img_size)
    if error is not None:
        working = [size for size in _probe_sizes(model) if _forward_error(model, size) is None]
        raise ModelConfigError(
            f"img_size={img_size} does not fit {_describe(model)}: a forward pass fails with "
            f"{type(error).__name__}: {error}\nSizes that work (tried multiples of 32 up to {_PROBE_SIZES[-1]} and "
            f"the model's default size): {', '.join(map(str, working)) or 'none'}. Set data.img_size to one of them.")


def _check_stride(model: nn.Module, img_size: int) -> None:
    stride = _total_stride(model)
    if stride and img_size < stride:
        raise ModelConfigError(
            f"img_size={img_size} is smaller than {_describe(model)}'s total stride ({stride}): its last stride-2 "
            f"stages would only see 1x1 maps. Use data.img_size >= {stride} (multiples of {stride} keep every "
            "stage's map whole; model.resolution is the paper's size).")


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _total_stride(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(i, dict) and "reduction" in i for i in info):
        return max(int(i["reduction"]) for i in info)
    return None


def _default_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else None


def _probe_sizes(model: nn.Module) -> list[int]:
    default = _default_size(model)
    return sorted(set(_PROBE_SIZES) | ({default} if default else set()))


def in_chans(model: nn.Module) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def _forward_error(model: nn.Module, img_size: int) -> Exception | None:
    if _meta_forward_error(model, img_size) is None:
        return None
    return _real_forward_error(model, img_size)


def _meta_forward_error(model: nn.Module, img_size: int) -> Exception | None:
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    # Two images: a batch of one would trip BatchNorm's training-mode check on 1x1 maps, which is no size problem.
    x = torch.empty(2, in_chans(model), img_size, img_size, device="meta")
    try:
        with torch.no_grad():
            functional_call(model, tensors, (x,))
    except _SHAPE_ERRORS as e:  # NotImplementedError (no meta kernel) is a RuntimeError too: the real pass decides
        return e
    return None


def _real_forward_error(model: nn.Module, img_size: int) -> Exception | None:
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros(1, in_chans(model), img_size, img_size, device=device, dtype=dtype)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except _SHAPE_ERRORS as e:
        return e
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm statistics stay untouched), then each module's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


