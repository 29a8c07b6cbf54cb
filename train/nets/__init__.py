"""The model layer: every network the project builds, measures, normalises for, or loads, and nothing else.

    registry   timm model creation by name, with the published variants timm lacks registered (`mt_*`)
    shapes     whether a network takes an image size, and which sizes it does
    macs       multiply-accumulates at an image size, as the papers count them
    normalize  uint8 batches -> normalised float: the one normalisation of training, teachers and exports
    files      the export directory's file names and the checkpoint's keys, named once
    load       the one loader of trained networks (export dir | checkpoint of ours | timm name + local weights)
    latency    batch-1 CPU latency of a network file in its runtime
    litert     LiteRT (.tflite): conversion, its interpreter, what XNNPACK takes (the optional `litert` extra)
    evaluate   one pass over val batches through several runtimes of a network: top-1, agreement, max |dlogit|
    compiled   torch.compile in place (checkpoint keys unchanged), the plain network back, inductor's needs
    zoo        each model config's params and MACs beside the paper's
    configs    where `conf/` is: model configs, and the config a run composes

It imports nothing of the project but `data_pipes`; `distill`, `train.quant`, `train.export` and the training
assembly build on it (docs/architecture.md). Importing it registers the `mt_*` variants with timm.
"""

from train.nets.load import LoadError, Settings, TrainedNetwork, load_network
from train.nets.macs import count_macs
from train.nets.normalize import normalize, normalize_images, pixel_stats
from train.nets.registry import ModelConfigError, UnknownModelError, check_model_name, create_model
from train.nets.shapes import check_img_size

__all__ = [
    "LoadError",
    "ModelConfigError",
    "Settings",
    "TrainedNetwork",
    "UnknownModelError",
    "check_img_size",
    "check_model_name",
    "count_macs",
    "create_model",
    "load_network",
    "normalize",
    "normalize_images",
    "pixel_stats",
]
