"""Ship a trained network: `<out>/{model.safetensors,config.json,model.onnx,metrics.json}`.

    python -m train.export RUN_DIR/checkpoints/last.ckpt [--out DIR] [--data-root DIR] [--batch-size B]

config.json is timm's own Hugging Face layout (written by `timm.models._hub.save_config_for_hf`), so the trained
model comes back with timm alone, classifier included:

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(architecture, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors", num_classes=N))

`metrics.json` is measured on a model rebuilt from the written files (that same user path), not on the module in
memory, so it describes exactly what ships. Everything is staged in a private folder and moved into place only once
every check passed: a failed export leaves a previous export untouched.
"""

from train.export.artifacts import (
    ARTIFACTS,
    ONNX_OPSET,
    ONNX_REL_TOL,
    ExportError,
    ExportReport,
    check_onnx,
    evaluate,
    export_model,
    export_onnx,
    load_exported,
    normalize,
)
from train.export.checkpoint import export_checkpoint, load_checkpoint, main

__all__ = [
    "ARTIFACTS",
    "ONNX_OPSET",
    "ONNX_REL_TOL",
    "ExportError",
    "ExportReport",
    "check_onnx",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "load_checkpoint",
    "load_exported",
    "main",
    "normalize",
]
