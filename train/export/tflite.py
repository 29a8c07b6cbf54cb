"""The float network as `model.tflite` (LiteRT), checked against PyTorch before it ships.

A failure here is LiteRT's alone: the export's other files are written as usual, `metrics.json` says what stopped
LiteRT (`tflite_error`, naming the op), and `python -m train.export` exits 3, as it does when an int8 runtime fails.
Without the `litert` extra there is no `.tflite` file, said once per process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.nets import litert
from train.nets.files import TFLITE_FILE

log = logging.getLogger(__name__)


@dataclass
class TfliteExport:
    runner: litert.TfliteRunner | None  # the written file in LiteRT's interpreter; None when there is none
    metrics: dict[str, Any] = field(default_factory=dict)  # for metrics.json


def export_tflite(model: nn.Module, stage: Path, x: torch.Tensor, *, architecture: str, rel_tol: float) -> TfliteExport:
    """Write `stage/model.tflite` from `model` (float, eval) and compare it with PyTorch on `x` (normalised NCHW
    check images): more than `rel_tol` x the logit scale apart, the file is withdrawn and the failure recorded."""
    if not litert.available():
        litert.say_missing_once()
        return TfliteExport(None)
    path = stage / TFLITE_FILE
    try:
        litert.write_tflite(model, path, int(x.shape[-1]), what=f"{architecture} (float)")
        runner = litert.TfliteRunner(path)
        with torch.inference_mode():
            ref = model(x)
        diff, scale = float((runner(x) - ref).abs().max()), float(ref.abs().max())
        if not diff <= rel_tol * scale:  # also catches NaN
            raise litert.LiteRTError(f"{TFLITE_FILE} disagrees with PyTorch: max |logit difference| {diff:.3g} "
                                     f"exceeds {rel_tol:g} x logit scale {scale:.3g}; the LiteRT graph is wrong")
        placed = litert.delegation(path)
    except litert.LiteRTError as e:
        log.error("export: %s", e)
        path.unlink(missing_ok=True)
        return TfliteExport(None, {"tflite_error": str(e)})
    if placed.outside_xnnpack:
        log.info("export: LiteRT runs outside XNNPACK: %s", litert.as_text(placed.outside_xnnpack))
    return TfliteExport(runner, {"tflite_input": litert.input_description(runner),
                                 "tflite_check_max_abs_diff": diff, "tflite_outside_xnnpack": placed.outside_xnnpack,
                                 "tflite_xnnpack_partitions": placed.partitions})
