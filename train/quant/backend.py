"""The int8 quantizer, behind one function: ExecuTorch's XNNPACK quantizer today (torchao's PT2E flow).

Per-channel symmetric int8 weights, per-tensor int8 activations, QAT observers (recipes.md §5c, §9). `weight_bits=7`
restricts weights to [-63, 63]: onnxruntime on x86 CPUs without VNNI computes int8 x int8 as uint8 x int8 and can
overflow with full-range weights, so its results drift from the PyTorch int8 model; 7-bit weights keep it in line.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'mobilenet-train[int8]'  (torchao, executorch, onnxruntime)"


class QuantError(RuntimeError):
    """Quantization cannot proceed; the message says why and what to do."""


def require(module: str) -> Any:
    """Import an optional int8 dependency, or stop with the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QuantError(f"qat / int8 export needs {module.split('.')[0]} ({e}): {INSTALL_HINT}") from None


def quantizer(backend: str, *, weight_bits: int, qat: bool):
    """The PT2E quantizer of `backend` (only `xnnpack` so far)."""
    if backend != "xnnpack":
        raise QuantError(f"quant.backend={backend!r}: only xnnpack (ExecuTorch's XNNPACK quantizer) is supported")
    if weight_bits not in (7, 8):
        raise QuantError(f"quant.weight_bits must be 8 or 7 (7: onnxruntime on x86 without VNNI), got {weight_bits}")
    xnn = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    require("torchao.quantization.pt2e.quantize_pt2e")
    from train.quant.patterns import cache_pattern_graphs

    cache_pattern_graphs()  # after both are imported: they hold the exporter under its own name
    limit = 2 ** (weight_bits - 1) - 1
    config = xnn.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, weight_qmin=-limit,
                                                   weight_qmax=limit)
    return xnn.XNNPACKQuantizer().set_global(config)
