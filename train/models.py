"""Build any MobileNet (or any timm model) by timm name, check input sizes, count MACs.

timm lacks four published variants: MobileNetV1 0.75/0.5/0.25, and MobileNetV3-Large minimalistic in PyTorch-native
form (timm only has the TF port, tf_mobilenetv3_large_minimal_100). Importing this module registers them with timm,
built by timm's own generator functions and with timm-style pretrained cfgs (no URL or hub id), so that after
`import train.models` every timm entry point knows them:

    timm.create_model("mt_mobilenetv1_050", pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="/path/model.safetensors", num_classes=N))

The `mt_` prefix (mobilenet-train, this project) marks where they come from, as timm's own `tf_`/`tv_` prefixes do,
so a MobileNet timm adds later under its plain name (e.g. `mobilenetv1_050`) can never collide with ours.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.models import efficientnet as _timm_effnet
from timm.models import generate_default_cfgs, register_model
from timm.models import mobilenetv3 as _timm_mnv3
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ModelConfigError",
    "UnknownModelError",
    "check_img_size",
    "count_macs",
    "create_model",
    "list_model_configs",
    "model_config_dir",
]

# Probed when a size fails, to tell the user which sizes do work.
_PROBE_SIZES = tuple(range(32, 513, 32))
# Errors a forward pass raises for an input shape the network cannot take (shape asserts, size mismatches).
_SHAPE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError)


class ModelConfigError(ValueError):
    """Bad model input from the user's config (name, sizes, rates); the message names the problem and the fix."""


class UnknownModelError(ModelConfigError):
    """A model name that neither timm nor this module registers."""


# ---------------------------------------------------------------------------------------------------------------
# Variants timm lacks. register_model reads `default_cfgs` from this module, so it must come first.

default_cfgs = generate_default_cfgs({
    "mt_mobilenetv1_075.untrained": _timm_effnet._cfg(),
    "mt_mobilenetv1_050.untrained": _timm_effnet._cfg(),
    "mt_mobilenetv1_025.untrained": _timm_effnet._cfg(),
    "mt_mobilenetv3_large_minimal_100.untrained": _timm_mnv3._cfg(),
})


@register_model
def mt_mobilenetv1_075(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV1 0.75 (arXiv 1704.04861, Table 6)."""
    return _timm_effnet._gen_mobilenet_v1("mt_mobilenetv1_075", 0.75, pretrained=pretrained, **kwargs)


@register_model
def mt_mobilenetv1_050(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV1 0.5 (arXiv 1704.04861, Table 6)."""
    return _timm_effnet._gen_mobilenet_v1("mt_mobilenetv1_050", 0.5, pretrained=pretrained, **kwargs)


@register_model
def mt_mobilenetv1_025(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV1 0.25 (arXiv 1704.04861, Table 6)."""
    return _timm_effnet._gen_mobilenet_v1("mt_mobilenetv1_025", 0.25, pretrained=pretrained, **kwargs)


@register_model
def mt_mobilenetv3_large_minimal_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV3-Large minimalistic 1.0 (no SE, hard-swish or 5x5): PyTorch-native twin of timm's TF port."""
    # The generator picks the minimalistic arch because the variant name contains "minimal" (and not "small").
    return _timm_mnv3._gen_mobilenet_v3("mt_mobilenetv3_large_minimal_100", 1.0, pretrained=pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Model configs (conf/model/*.yaml)


def model_config_dir() -> Path:
    """conf/model/: one YAML per `model=<key>` choice."""
    return Path(__file__).resolve().parents[1] / "conf" / "model"


def list_model_configs() -> list[str]:
    """Every `model=<key>` choice, sorted (the file names of conf/model/*.yaml, `timm` included)."""
    directory = model_config_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"model configs not found at {directory}: run from a source checkout of this repo")
    return sorted(path.stem for path in directory.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------------
# Building


def create_model(name: str, *, num_classes: int, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, **kwargs) -> nn.Module:
    """A freshly initialised timm model (never downloads weights).

    Args:
        name: a timm model name (`timm.list_models()`) or one of the variants registered above.
        num_classes: classifier outputs; 0 leaves the classifier out (timm returns pooled features).
        drop_rate: classifier dropout; None keeps the model's default.
        drop_path_rate: stochastic-depth rate of the last block (timm ramps it up linearly); None keeps the default.
        **kwargs: passed to the timm model (e.g. `in_chans`).
    """
    if "pretrained" in kwargs:
        raise ModelConfigError("create_model never loads weights; to load a file use timm.create_model(name, "
                               "pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N))")
    _check_num_classes(num_classes)
    rates = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
    for arg, value in rates.items():
        _check_rate(arg, value)
    check_model_name(name)
    chosen = {arg: value for arg, value in rates.items() if value is not None}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **chosen, **kwargs)


def check_model_name(name: str) -> None:
    """Raise UnknownModelError (listing the valid choices) unless timm or this module knows `name`."""
    if not timm.is_model(name):
        raise UnknownModelError(_unknown_model_message(name))


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ModelConfigError(f"num_classes must be a non-negative int (the dataset's class count), "
                               f"got {num_classes!r}")


def _check_rate(arg: str, value: float | None) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (is_number and 0.0 <= value < 1.0):
        raise ModelConfigError(f"{arg} must be in [0, 1) (a probability), got {value!r}; set model.{arg} accordingly")


def _unknown_model_message(name: str) -> str:
    keys = list_model_configs()
    if name in keys:
        return (f"{name!r} is a model config key, not a timm model name: choose it with `model={name}` "
                f"(its timm name is in conf/model/{name}.yaml)")
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    lines = [
        f"unknown model {name!r}: neither timm {timm.__version__} nor train.models registers it.",
        f"Model configs (`model=<key>`): {', '.join(keys)}.",
        f"Close timm names: {', '.join(close)}." if close else "No timm name is close to it.",
        "Any timm model trains with `model=timm model.name=<timm name>` (timm.list_models() lists the names).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Input sizes


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


def _in_chans(model: nn.Module) -> int:
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
    x = torch.empty(2, _in_chans(model), img_size, img_size, device="meta")
    try:
        with torch.no_grad():
            functional_call(model, tensors, (x,))
    except _SHAPE_ERRORS as e:  # NotImplementedError (no meta kernel) is a RuntimeError too: the real pass decides
        return e
    return None


def _real_forward_error(model: nn.Module, img_size: int) -> Exception | None:
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros(1, _in_chans(model), img_size, img_size, device=device, dtype=dtype)
    try:
        with _eval_mode(model), torch.no_grad():
            model(x)
    except _SHAPE_ERRORS as e:
        return e
    return None


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm statistics stay untouched), then each module's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------------------------
# MACs


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of softmax(q k^T) v; key/value may carry fewer heads than the query (multi-query)."""
    *batch_and_heads, query_len, key_dim = query_shape
    key_len, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch_and_heads) * query_len * key_len * (key_dim + value_dim)


# torch's counter knows the CUDA attention kernels but not the CPU one F.scaled_dot_product_attention runs on CPU,
# so without this the MNv4 hybrids' attention matmuls would count as zero.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one image at img_size x img_size, counted by torch's FlopCounterMode.

    Counts what papers count as MAdds: convolutions (depthwise ones by their per-group weights), linear layers,
    matmuls and attention; not BatchNorm, activations, pooling or elementwise ops. The model is run once in eval
    mode under no_grad and left as it was.
    """
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros(1, _in_chans(model), img_size, img_size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2
