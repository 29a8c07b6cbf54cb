"""Ship a trained network: `<out>/{model.safetensors,config.json,model.onnx,model.tflite,metrics.json}`.

    python -m train.export RUN_DIR/checkpoints/best.ckpt [--out DIR] [--data-root DIR] [--batch-size B] [--replace]

A run exports itself to `<run dir>/export` at its end; a re-export goes beside it (`<run dir>/export-best`, named for
the checkpoint) unless `--replace` asks for the run's own directory.

config.json is timm's own Hugging Face layout (written by `timm.models._hub.save_config_for_hf`), so the trained
model comes back with timm alone, classifier included:

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(architecture, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors", num_classes=N))

`metrics.json` is measured on a model rebuilt from the written files (that same user path), not on the module in
memory, so it describes exactly what ships. Everything is staged in a private folder and moved into place only once
every check passed: a failed export leaves a previous export untouched.

    artifacts   the export itself (weights, config, ONNX checked in onnxruntime, metrics), published atomically
    tflite      the float network in LiteRT (with the litert extra), checked, evaluated beside PyTorch
    checkpoint  a checkpoint -> its network (float, QAT, PTQ-calibrated) and its val shards -> the export
    provenance  what a run and its export were made from (code, command, versions, data, teacher)
    cli         the command line (`python -m train.export`)
"""

from train.export.artifacts import (
    ONNX_REL_TOL,
    ExportError,
    ExportReport,
    check_onnx,
    evaluate,
    export_model,
    export_onnx,
)
from train.export.checkpoint import export_checkpoint, export_quantized
from train.export.cli import main

__all__ = [
    "ONNX_REL_TOL",
    "ExportError",
    "ExportReport",
    "check_onnx",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "export_quantized",
    "main",
]
