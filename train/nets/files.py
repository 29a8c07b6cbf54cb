"""What a trained network is stored as: the export directory's files and the checkpoint's keys, named once.

An export directory (`<run dir>/export/`, written by `train.export`):

    model.safetensors   the network's weights (EMA weights when the run kept an EMA)
    config.json         timm's own Hugging Face config: architecture, num_classes, label_names and the
                        preprocessing (`pretrained_cfg`: DATA_CONFIG_KEYS); timm's `local-dir:` loading reads it
    model.onnx          the float network in ONNX (opset ONNX_OPSET, ONNX_INPUT -> ONNX_OUTPUT, dynamic batch)
    metrics.json        written last: its presence means the other files are complete and checked
    model_int8.pte      QAT / PTQ only: ExecuTorch program, XNNPACK-delegated
    model_int8.onnx     QAT / PTQ only: QDQ ONNX for onnxruntime
    model.tflite        the float network in LiteRT (NHWC batch-1 input: train.nets.litert), with the litert extra
    model_int8.tflite   QAT / PTQ only, with the litert extra: int8 LiteRT, from the same prepared graph as the others

A checkpoint of `python -m train` is a Lightning checkpoint holding plain values only (it loads with
`torch.load(weights_only=True)`): CHECKPOINT_KEYS, the network's weights under NETWORK_PREFIX in `state_dict`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
METRICS_FILE = "metrics.json"
# Written in this order; metrics.json last, so its presence in an export dir means the other three are complete.
ARTIFACTS = (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE, METRICS_FILE)
INT8_PTE_FILE = "model_int8.pte"
INT8_ONNX_FILE = "model_int8.onnx"
TFLITE_FILE = "model.tflite"
INT8_TFLITE_FILE = "model_int8.tflite"

# The preprocessing a network was trained with: timm's resolved data config, kept in checkpoints and config.json.
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")

# torchlib's native opset (no version-conversion pass); run by onnxruntime >= 1.14 and TensorRT >= 8.6.
ONNX_OPSET = 18
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"

CHECKPOINT_KEYS = ("state_dict", "run_config", "dataset", "data_config")
NETWORK_PREFIX = "model."  # the LightningModule's attribute holding the network
TRAIN_HINT = "`python -m train` (it writes <run dir>/checkpoints/last.ckpt and best.ckpt)"


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """Keep torch.onnx's per-pass INFO chatter (hundreds of lines from onnxscript and onnx_ir) out of the logs."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
