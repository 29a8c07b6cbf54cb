"""Build any MobileNet (or any timm model) by timm name; register the published variants timm lacks.

timm lacks four published variants: MobileNetV1 0.75/0.5/0.25, and MobileNetV3-Large minimalistic in PyTorch-native
form (timm only has the TF port, tf_mobilenetv3_large_minimal_100). Importing this module (any `train.nets` import
does) registers them with timm, built by timm's own generator functions and with timm-style pretrained cfgs (no URL
or hub id), so that after `import train.nets` every timm entry point knows them:

    timm.create_model("mt_mobilenetv1_050", pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="/path/model.safetensors", num_classes=N))

The `mt_` prefix (mobilenet-train, this project) marks where they come from, as timm's own `tf_`/`tv_` prefixes do,
so a MobileNet timm adds later under its plain name (e.g. `mobilenetv1_050`) can never collide with ours.
"""

from __future__ import annotations

import difflib

import timm
from timm.models import efficientnet as _timm_effnet
from timm.models import generate_default_cfgs, register_model
from timm.models import mobilenetv3 as _timm_mnv3
from torch import nn

from data_pipes.errors import UserError
from train.nets.configs import list_model_configs


class ModelConfigError(UserError, ValueError):
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
        f"unknown model {name!r}: neither timm {timm.__version__} nor train.nets registers it.",
        f"Model configs (`model=<key>`): {', '.join(keys)}.",
        f"Close timm names: {', '.join(close)}." if close else "No timm name is close to it.",
        "Any timm model trains with `model=timm model.name=<timm name>` (timm.list_models() lists the names).",
    ]
    return "\n".join(lines)


