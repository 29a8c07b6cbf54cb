"""int8 deployment: convert the fake-quant network, write `model_int8.pte` (ExecuTorch, XNNPACK),
`model_int8.onnx` (QDQ, onnxruntime) and, with the litert extra, `model_int8.tflite` (LiteRT), and measure each file
**in its own runtime** on the validation images. All come from the same prepared graph (one QAT run or one
calibration): ExecuTorch and ONNX take it converted with folded int8 weights, LiteRT's converter takes a second
conversion that keeps the weights' quantize nodes (it folds them itself), so no runtime sees other ranges.

What is measured: top-1/top-5 of the converted PyTorch int8 model and of each runtime, each
runtime's top-1 agreement with the PyTorch int8 model and its max |logit difference|, file sizes, and batch-1 CPU
latency per image of the float and int8 model in each runtime. A runtime whose agreement falls below its threshold
is reported as a failure (`Int8Report.failures`), never silently.

The int8 logits move in steps of the output's scale (`int8_output_step`). Where the PyTorch int8 model's two best
classes are within one step of each other, a runtime whose integer kernels round one logit by a step picks the
other class: on a briefly trained model whose logits span a few units, that is most disagreements. So each runtime's
agreement is also given on the images the int8 model decides, its top-2 logits two or more steps apart
(`int8_decided`: their share; `int8_<runtime>_agreement_decided`).

What the backend cannot quantize stays float rather than failing, and is reported: `int8_kept_float` (compute ops
the quantizer left in float, e.g. MNv4-Hybrid's attention), `pte_outside_xnnpack` (ops ExecuTorch runs with its
portable kernels because XNNPACK did not take them), `int8_tflite_outside_xnnpack` (the same for LiteRT) and
`int8_tflite_float_ops` (what the int8 .tflite computes in float between a DEQUANTIZE and a QUANTIZE).
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim

from data_pipes.errors import UserError
from train.nets import litert
from train.nets.evaluate import measure as measure_runtimes
from train.nets.files import (
    INT8_ONNX_FILE,
    INT8_PTE_FILE,
    INT8_TFLITE_FILE,
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUT,
    quiet_onnx_exporter,
)
from train.nets.latency import onnx_latencies
from train.quant.backend import QuantError, onnx_weight_bits_hint, require
from train.quant.network import drop_batch_counters

log = logging.getLogger(__name__)
PTE_FILE, ONNX_FILE, TFLITE_FILE = INT8_PTE_FILE, INT8_ONNX_FILE, INT8_TFLITE_FILE
ONNX_MAX_BATCH = 1024


def convert(graph: torch.fx.GraphModule, *, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """The int8 PyTorch model (quantize/dequantize around int8 weights) of a prepared graph (QAT or calibrated
    PTQ); `graph` is untouched. `fold_quantize=False` keeps each weight as float + quantize node (what LiteRT's
    converter lowers; ExecuTorch needs them folded): both compute the same outputs."""
    pt2e = require("torchao.quantization.pt2e")
    quantize = require("torchao.quantization.pt2e.quantize_pt2e")
    # Training may have made the weights channels_last; the lowering passes expect the layout they were traced in.
    prepared = copy.deepcopy(graph).to(memory_format=torch.contiguous_format)
    prepared.apply(pt2e.disable_observer)
    converted = quantize.convert_pt2e(prepared, fold_quantize=fold_quantize)
    pt2e.move_exported_model_to_eval(converted)
    drop_batch_counters(converted)
    return converted


# Ops that carry a network's arithmetic: if one of these runs without a dequantized input, it computes in float.
COMPUTE_OPS = ("conv", "linear", "matmul", "bmm", "mm.", "addmm", "scaled_dot_product_attention", "einsum",
               "softmax", "layer_norm", "batch_norm", "mean", "avg_pool", "max_pool", "add.", "mul.", "hardswish",
               "hardsigmoid", "sigmoid", "gelu", "silu")


def output_step(converted: torch.fx.GraphModule) -> float | None:
    """The step of the int8 model's logits: the scale its output is dequantized with (None: a float output)."""
    out = next(n for n in converted.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (list, tuple)) else out
    if getattr(node, "op", None) == "call_function" and "dequantize_per_tensor" in str(node.target):
        return float(node.args[1])
    return None


def kept_float(converted: torch.fx.GraphModule) -> dict[str, int]:
    """Compute ops of the converted model that the quantizer left in float (none of their inputs is dequantized
    int8), by op: what the int8 model computes in float."""
    out: dict[str, int] = {}
    for node in converted.graph.nodes:
        name = str(node.target)
        if node.op != "call_function" or "quantize" in name or not any(op in name for op in COMPUTE_OPS):
            continue
        if not any("dequantize" in str(arg.target) for arg in node.all_input_nodes if arg.op == "call_function"):
            op = name.removeprefix("aten.").split(".")[0]
            out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))


def _outside_delegate(lowered) -> dict[str, int]:
    """Ops of a lowered ExecuTorch program that run outside XNNPACK (ExecuTorch's portable kernels), by op."""
    backend_debug = require("executorch.devtools.backend_debug")
    info = backend_debug.get_delegation_info(lowered.exported_program().graph_module)
    skip = ("getitem", "sym_size", "alloc")  # bookkeeping, not arithmetic
    return {op: b.non_delegated for op, b in sorted(info.delegation_by_operator.items())
            if b.non_delegated and not any(k in op for k in skip)}


def _program(model: nn.Module, img_size: int, dynamic: bool):
    x = torch.randn(2, 3, img_size, img_size)
    shapes = ({0: Dim("batch", min=1, max=ONNX_MAX_BATCH)},) if dynamic else None
    return torch.export.export(model, (x if dynamic else x[:1],), dynamic_shapes=shapes)


@dataclass
class PteFile:
    dynamic: bool  # the batch dimension is dynamic (else the program takes batch 1)
    outside_xnnpack: dict[str, int]  # ops ExecuTorch runs itself, by op (empty: all in XNNPACK)


def write_pte(model: nn.Module, path: Path, img_size: int) -> PteFile:
    """ExecuTorch program lowered to XNNPACK (what XNNPACK does not take runs on ExecuTorch's portable kernels)."""
    exir = require("executorch.exir")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    for dynamic in (True, False):
        try:
            edge = exir.to_edge_transform_and_lower(_program(model, img_size, dynamic),
                                                    partitioner=[xnn.XnnpackPartitioner()])
            outside = _outside_delegate(edge)
            lowered = edge.to_executorch()
        except Exception as e:  # noqa: BLE001 - a static batch is the fallback the format allows
            if not dynamic:
                raise QuantError(f"ExecuTorch cannot lower the int8 model: {type(e).__name__}: {str(e)[:400]}") \
                    from None
            log.warning("ExecuTorch: a dynamic batch did not lower (%s); writing a batch-1 program", e)
            continue
        path.write_bytes(lowered.buffer)
        return PteFile(dynamic, outside)
    raise AssertionError("unreachable: the static program either lowers or raises")


def write_onnx(model: nn.Module, path: Path, img_size: int) -> None:
    """QDQ ONNX (QuantizeLinear/DequantizeLinear around int8 weights), dynamic batch, one file."""
    with quiet_onnx_exporter():
        program = torch.onnx.export(model, (torch.randn(2, 3, img_size, img_size),), input_names=[ONNX_INPUT],
                                    output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET,
                                    dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False)
        program.save(str(path), external_data=False)


# ------------------------------------------------------------------------------------------------ runtimes


class PteRunner:
    """A .pte file in the ExecuTorch runtime. A dynamic batch is bounded by the memory ExecuTorch planned for the
    input (not by the export's Dim bound), so the largest batch that runs is probed once and bigger batches are run
    in pieces of that size; a static program runs image by image."""

    name = "pte"

    def __init__(self, path: Path, dynamic: bool, img_size: int) -> None:
        runtime = require("executorch.runtime")
        self.method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
        self.max_batch = self._probe(img_size) if dynamic else 1

    def _probe(self, img_size: int) -> int:
        best = 1
        with litert.quiet_native_stderr():  # ExecuTorch logs each refused size to stderr ("Error resizing tensor")
            for batch in (2, 4, 8, 16, 32, 64):
                try:
                    self.method.execute([torch.zeros(batch, 3, img_size, img_size)])
                except RuntimeError:
                    break
                best = batch
        return best

    def __call__(self, x: Tensor) -> Tensor:
        step = self.max_batch
        return torch.cat([self.method.execute([x[i:i + step].contiguous()])[0] for i in range(0, x.size(0), step)])


class OnnxRunner:
    name = "onnx"

    def __init__(self, path: Path) -> None:
        ort = require("onnxruntime")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input, self.output = ONNX_INPUT, ONNX_OUTPUT

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run([self.output], {self.input: np.ascontiguousarray(x.numpy())})[0])


def latency_ms(run: Callable[[Tensor], Any], img_size: int, repeats: int = 30) -> float:
    """Median ms for one image (batch 1), after a few warm-up calls."""
    x = torch.randn(1, 3, img_size, img_size)
    with torch.inference_mode():
        for _ in range(3):
            run(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Int8Report:
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def measure(models: Mapping[str, Callable[[Tensor], Tensor]], reference: str, batches: Iterable[Mapping[str, Any]],
            *, mean: Sequence[float], std: Sequence[float], num_classes: int,
            decided_margin: float | None = None) -> dict[str, dict[str, float]]:
    """train.nets.evaluate.measure, its error a QuantError."""
    try:
        return measure_runtimes(models, reference, batches, mean=mean, std=std, num_classes=num_classes,
                                decided_margin=decided_margin)
    except UserError as e:
        raise QuantError(str(e)) from None


@dataclass
class TfliteInt8:
    runner: litert.TfliteRunner | None
    metrics: dict[str, Any]
    failure: str | None = None


def write_tflite_int8(graph: torch.fx.GraphModule, path: Path, img_size: int) -> TfliteInt8:
    """model_int8.tflite from the prepared `graph`; a conversion LiteRT refuses is a failure of this runtime only."""
    try:
        litert.write_tflite(convert(graph, fold_quantize=False), path, img_size, what="the int8 model", int8=True)
        runner = litert.TfliteRunner(path)
        placed = litert.delegation(path)
    except litert.LiteRTError as e:
        path.unlink(missing_ok=True)
        return TfliteInt8(None, {"int8_tflite_error": str(e)}, failure=f"tflite: {e}")
    return TfliteInt8(runner, {"int8_tflite_input": litert.input_description(runner),
                               "int8_tflite_outside_xnnpack": placed.outside_xnnpack,
                               "int8_tflite_xnnpack_partitions": placed.partitions,
                               "int8_tflite_float_ops": placed.float_ops})


def deploy(graph: torch.fx.GraphModule, fake_quant: nn.Module | None, float_model: nn.Module, out_dir: Path,
           batches: Iterable, *, img_size: int, mean: Sequence[float], std: Sequence[float], num_classes: int,
           min_agreement: Mapping[str, float], max_top1_drop: float, latency: bool, tflite: bool) -> Int8Report:
    """Convert the prepared `graph`, write the int8 files into `out_dir` (with `tflite` and the litert extra, the
    LiteRT one too), and measure the float model, the fake-quant one (`fake_quant`: the QAT network; None for PTQ,
    whose calibrated graph computes in float), int8 PyTorch and each runtime (with `latency`, also batch-1 CPU
    latency of float and int8 in each runtime). A runtime below its `min_agreement`, one that cannot convert the
    model, or an int8 model more than `max_top1_drop` points of top-1 below the float one, is a failure in the
    report; the other runtimes' files are written and measured all the same."""
    out_dir = Path(out_dir)
    converted = convert(graph)
    files = _write_files(graph, converted, out_dir, img_size, tflite)
    runners = files.runners
    float_model = float_model.eval()
    models = {"float": float_model, "int8_torch": converted, **runners}
    if fake_quant is not None:
        models["fakequant"] = copy.deepcopy(fake_quant).eval()
    step = output_step(converted)
    results = measure(models, "int8_torch", batches, mean=mean, std=std, num_classes=num_classes,
                      decided_margin=None if step is None else 1.5 * step)  # logits are whole steps apart: >= 2
    metrics: dict[str, Any] = {"val_images": results["float"]["images"]}
    if step is not None:
        metrics["int8_output_step"], metrics["int8_decided"] = step, results["int8_torch"]["decided"]
    for name in models:
        key = f"int8_{name}" if name in runners else name
        metrics[f"{key}_top1"], metrics[f"{key}_top5"] = results[name]["top1"], results[name]["top5"]
    metrics["int8_kept_float"], metrics["pte_outside_xnnpack"] = kept_float(converted), files.pte.outside_xnnpack
    metrics.update(files.lite.metrics if files.lite is not None else {})
    for what, key in (("the int8 model computes in float", "int8_kept_float"),
                      ("ExecuTorch runs outside XNNPACK", "pte_outside_xnnpack"),
                      ("the int8 .tflite computes in float", "int8_tflite_float_ops")):
        if metrics.get(key):
            log.warning("int8 export: %s: %s", what, litert.as_text(metrics[key]))
    report = Int8Report(metrics, failures=[files.lite.failure] if files.lite and files.lite.failure else [])
    report.failures += _threshold_failures(results, metrics, runners, min_agreement, max_top1_drop)
    metrics["size_mb"] = {f"int8_{name}": (out_dir / file).stat().st_size / 1e6
                          for name, file in (("pte", PTE_FILE), ("onnx", ONNX_FILE), ("tflite", TFLITE_FILE))
                          if name in runners}
    if latency:
        metrics["latency_ms"] = _latencies(float_model, converted, runners, img_size, out_dir)
    metrics["pte_max_batch"] = runners["pte"].max_batch
    for failure in report.failures:
        log.error("int8 export: %s", failure)
    return report


@dataclass
class _Files:
    runners: dict[str, Callable[[Tensor], Tensor]]  # each written file in its runtime, by runtime
    pte: PteFile
    lite: TfliteInt8 | None  # None: LiteRT not asked for, or not installed


def _write_files(graph: torch.fx.GraphModule, converted: torch.fx.GraphModule, out_dir: Path, img_size: int,
                 tflite: bool) -> _Files:
    pte_file = write_pte(converted, out_dir / PTE_FILE, img_size)
    write_onnx(converted, out_dir / ONNX_FILE, img_size)
    runners = {"pte": PteRunner(out_dir / PTE_FILE, pte_file.dynamic, img_size),
               "onnx": OnnxRunner(out_dir / ONNX_FILE)}
    lite = None
    if tflite and not litert.available():
        litert.say_missing_once()
    elif tflite:
        lite = write_tflite_int8(graph, out_dir / TFLITE_FILE, img_size)
        if lite.runner is not None:
            runners["tflite"] = lite.runner
    return _Files(runners, pte_file, lite)


def _threshold_failures(results: Mapping[str, Mapping[str, float]], metrics: dict[str, Any],
                        runners: Mapping[str, Any], min_agreement: Mapping[str, float],
                        max_top1_drop: float) -> list[str]:
    """Each runtime's agreement (recorded in `metrics`) against its threshold, and the int8 model's top-1 drop."""
    failures = []
    for name in runners:
        agree, diff = results[name]["agree"], results[name]["max_diff"]
        metrics[f"int8_{name}_agreement"], metrics[f"int8_{name}_max_abs_diff"] = agree, diff
        decided = ""
        if "agree_decided" in results[name]:
            metrics[f"int8_{name}_agreement_decided"] = results[name]["agree_decided"]
            decided = (f"; {results[name]['agree_decided']:.1f}% on the {results[name]['decided']:.0f}% of images "
                       f"whose int8 top-2 logits are two or more output steps apart")
        if agree < float(min_agreement[name]):
            failures.append(f"{name}: top-1 agreement with the PyTorch int8 model {agree:.1f}% is below "
                            f"quant.min_agreement.{name}={min_agreement[name]}% (max |logit diff| {diff:.3g}"
                            f"{decided})" + (onnx_weight_bits_hint() if name == "onnx" else ""))
    drop = metrics["float_top1"] - metrics["int8_torch_top1"]
    if drop > float(max_top1_drop):  # every runtime may agree with an int8 model that has collapsed
        failures.append(f"int8: the PyTorch int8 model's top-1 {metrics['int8_torch_top1']:.2f}% is {drop:.2f} "
                        f"points below the float model's {metrics['float_top1']:.2f}% (quant.max_top1_drop="
                        f"{max_top1_drop})")
    return failures


def _latencies(float_model: nn.Module, converted: nn.Module, runners: Mapping[str, Any], img_size: int,
               out_dir: Path) -> dict[str, float]:
    """Batch-1 CPU ms per image: int8 in onnxruntime and LiteRT (1 thread and all cores, as the float export
    measures its ONNX and LiteRT files), int8 and float in ExecuTorch (a float program lowered here just to time it)
    and in PyTorch."""
    out = {**onnx_latencies(out_dir / ONNX_FILE, img_size, prefix="int8_"),
           "int8_pte": latency_ms(runners["pte"], img_size),
           "float_torch": latency_ms(float_model, img_size), "int8_torch": latency_ms(converted, img_size)}
    if "tflite" in runners:
        out.update(litert.tflite_latencies(out_dir / TFLITE_FILE, img_size, prefix="int8_"))
    with tempfile.TemporaryDirectory() as tmp:
        float_pte = Path(tmp) / "float.pte"
        float_file = write_pte(float_model, float_pte, img_size)
        out["float_pte"] = latency_ms(PteRunner(float_pte, float_file.dynamic, img_size), img_size)
    return out
