"""The int8 quantizer, behind one function: ExecuTorch's XNNPACK quantizer today (torchao's PT2E flow).

Per-channel symmetric int8 weights, per-tensor int8 activations, QAT observers (ExecuTorch's XNNPACKQuantizer,
`get_symmetric_quantization_config(is_per_channel=True, is_qat=True)`). `weight_bits=7`
restricts weights to [-63, 63]: onnxruntime on x86 CPUs without VNNI computes int8 x int8 as uint8 x int8 and can
overflow with full-range weights, so its results drift from the PyTorch int8 model; 7-bit weights keep it in line.
"""

from __future__ import annotations

import dataclasses
import importlib
import platform
from functools import cache
from pathlib import Path
from typing import Any

from timm.layers import LayerScale2d

from data_pipes.errors import UserError
from train.quant.patterns import cache_pattern_graphs

INSTALL_HINT = "pip install 'mobilenet-train[int8]'  (torchao, executorch, onnxruntime)"


class QuantError(UserError, RuntimeError):
    """Quantization cannot proceed; the message says why and what to do."""


def require(module: str) -> Any:
    """Import an optional int8 dependency, or stop with the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QuantError(f"qat / int8 export needs {module.split('.')[0]} ({e}): {INSTALL_HINT}") from None


@cache
def onnxruntime_int8_overflows(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX512-VNNI or AVX-VNNI), where onnxruntime's fused int8 kernels compute
    int8 x int8 as uint8 x int8 and overflow with full-range 8-bit weights (measured: top-1 agreement with the
    PyTorch int8 model 79-85 % there, 94 % with 7-bit weights). Other architectures, and x86 hosts whose CPU flags
    cannot be read (no /proc/cpuinfo), count as not affected."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(flags) and not {"avx512_vnni", "avx_vnni"} & set(flags)


def onnx_weight_bits_hint() -> str:
    """What to say when onnxruntime disagrees with the PyTorch int8 model, on this host."""
    if onnxruntime_int8_overflows():
        return ("; this CPU has no VNNI, where onnxruntime's int8 kernels overflow with full-range 8-bit weights: "
                "QAT with quant.weight_bits=7 keeps onnxruntime on such CPUs in line")
    return ""


# PTQ activation observers (quant.ptq_observer). ExecuTorch's own choice for PTQ is the histogram observer, whose
# range search fails on outliers: on MNv4-Conv-S, one calibration image drove the head's activation range to 666
# (others stay below 3) and the int8 model collapsed to chance (bench.qat_evidence); a moving average of each batch's
# min/max kept it within 0.1 point of float.
PTQ_OBSERVERS = {"moving_average": "MovingAverageMinMaxObserver", "minmax": "MinMaxObserver",
                 "histogram": "HistogramObserver"}


def quantizer(backend: str, *, weight_bits: int, qat: bool, ptq_observer: str | None = None):
    """The PT2E quantizer of `backend` (only `xnnpack` so far). `ptq_observer` (PTQ only; None: the backend's
    own) chooses how calibration sets the activation ranges."""
    if backend != "xnnpack":
        raise QuantError(f"quant.backend={backend!r}: only xnnpack (ExecuTorch's XNNPACK quantizer) is supported")
    if weight_bits not in (7, 8):
        raise QuantError(f"quant.weight_bits must be 8 or 7 (7: onnxruntime on x86 without VNNI), got {weight_bits}")
    if ptq_observer is not None and ptq_observer not in PTQ_OBSERVERS:
        raise QuantError(f"quant.ptq_observer={ptq_observer!r}: choose one of {', '.join(PTQ_OBSERVERS)}")
    xnn = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    require("torchao.quantization.pt2e.quantize_pt2e")
    cache_pattern_graphs()  # after both are imported: they hold the exporter under its own name
    limit = 2 ** (weight_bits - 1) - 1
    config = xnn.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, weight_qmin=-limit,
                                                   weight_qmax=limit)
    if ptq_observer is not None and not qat:
        observers = require("torchao.quantization.pt2e.observer")
        ctr = getattr(observers, PTQ_OBSERVERS[ptq_observer]).with_args(eps=2**-12)  # XNNPACK's eps
        config = dataclasses.replace(config, **{
            k: dataclasses.replace(getattr(config, k), observer_or_fake_quant_ctr=ctr)
            for k in ("input_activation", "output_activation")})
    quantizer = xnn.XNNPACKQuantizer().set_global(config)
    for module_type in FLOAT_MODULES:
        quantizer.set_module_type(module_type, None)  # None: the quantizer leaves the module's ops in float
    return quantizer


# Modules whose ops stay float on purpose. MobileNetV4's hybrid blocks scale each residual branch by a learned
# per-channel gamma (layer scale, initialised at 1e-5): quantized, gamma x activation falls below one step of the
# activation's int8 scale and the branch rounds to zero, which collapsed MNv4-Hybrid-M's int8 output to a constant.
# One multiply per block in float costs little; its input and output stay int8 (reported as `int8_kept_float` where
# a runtime computes it in float: `int8_tflite_float_ops`). Attention's matmuls and softmax are left float by the
# quantizer itself (XNNPACK has no int8 kernels for them).
FLOAT_MODULES = (LayerScale2d,)
