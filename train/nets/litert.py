"""LiteRT (formerly TensorFlow Lite), the runtime most MobileNets ship in on phones: a network -> `.tflite` file
(converted by litert-torch, no TensorFlow needed), run in LiteRT's own interpreter with XNNPACK as shipped.

The file's input is what phone apps feed: one image, channels last (NHWC `[1, H, W, 3]`, the layout of Android's
Bitmap/TensorImage and iOS's pixel buffers, so no transpose runs on the phone), normalised as `config.json` says
(`pretrained_cfg` mean/std); the output is `[1, num_classes]` logits. Float files take float32; int8 files take and
give int8 tensors whose scale and zero point the interpreter reports (`TfliteRunner` quantizes and dequantizes with
them). The graph has batch 1, as LiteRT's converter makes it.

litert-torch and ai-edge-litert are the optional `litert` extra: `available()` says whether they are installed, and
nothing here imports them before a function needs them (a run without the extra never loads them).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data_pipes.errors import UserError
from data_pipes.shards.make import default_workers  # the CPUs this process may use
from train.nets.latency import REPEATS, WARMUP

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mobilenet-train[litert]'  (litert-torch, ai-edge-litert; make test installs it)"
INPUT_LAYOUT = "NHWC"


class LiteRTError(UserError, RuntimeError):
    """LiteRT cannot convert or run a network; the message names the op that stopped it and what to do."""


def available() -> bool:
    """Whether the `litert` extra is installed (without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))


_said_missing = False


def say_missing_once() -> None:
    """Log, once per process, that exports carry no .tflite file because the extra is not installed."""
    global _said_missing
    if not _said_missing:
        log.info("LiteRT: no .tflite files (the litert extra is not installed): %s", INSTALL_HINT)
        _said_missing = True


def require(module: str) -> Any:
    """Import a module of the `litert` extra, or stop with how to install it."""
    # litert-torch imports torchao, which registers an Enum with torch's pytree and gets a deprecation warning on
    # torch's own handler for it (torch now handles Enums natively): harmless, and not the user's to act on.
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LiteRTError(f"LiteRT exports need {module.split('.')[0]} ({e}): {INSTALL_HINT}") from None
    finally:
        pytree.setLevel(level)


# ------------------------------------------------------------------------------------------------ converting


def _channels_last(model: nn.Module) -> nn.Module:
    """`model` behind an NHWC input (litert-torch's own wrapper: the transpose folds into the first convolution)."""
    wrapped = require("litert_torch").to_channel_last_io(model, args=[0])
    for module in wrapped.modules():  # an exported int8 graph refuses .eval(); it is in eval mode already
        module.training = False
    return wrapped


def explicit_attention(model: nn.Module) -> nn.Module:
    """`model`, or a copy of it that computes attention as explicit matmul, softmax and matmul: the same arithmetic,
    which litert-torch 0.10 converts exactly, where it lowers `F.scaled_dot_product_attention` wrongly when keys and
    values have fewer heads than the queries (MNv4's multi-query attention: MNv4-Hybrid-M's float logits off by 25-45 %
    of their scale at 64-224 px, its int8 ones by several output steps). A timm network gets `fused_attn=False` (timm's
    own explicit path); an exported graph (the int8 model) gets each attention op rewritten in place of the copy, so
    the quantized graph, its observers and what the other runtimes run stay as trained."""
    if isinstance(model, torch.fx.GraphModule):
        if not any(n.target is _SDPA for n in model.graph.nodes):
            return model
        model = copy.deepcopy(model)
        for node in [n for n in model.graph.nodes if n.target is _SDPA]:
            _write_out_attention(model.graph, node)
        model.graph.lint()
        model.recompile()
        return model
    if not any(getattr(m, "fused_attn", False) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
    return model


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _write_out_attention(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace one `scaled_dot_product_attention` node by softmax(q * scale @ k^T) @ v, broadcasting k and v over the
    query heads as the fused op does (timm's explicit path, op for op)."""
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args)) | node.kwargs
    unsupported = {k: args[k] for k in ("attn_mask", "is_causal", "enable_gqa") if args.get(k) not in (None, False)}
    if float(args.get("dropout_p", 0.0)) != 0.0:
        unsupported["dropout_p"] = args["dropout_p"]
    if unsupported:
        raise LiteRTError(f"LiteRT cannot convert the attention op {node.name} with {unsupported}: only plain "
                          f"attention (no mask, causal flag, dropout or grouped heads) is written out for LiteRT; "
                          f"export without LiteRT (export_tflite=false / --no-tflite)")
    query, key, value = args["query"], args["key"], args["value"]
    scale = args.get("scale")
    if scale is None:
        scale = float(_shape(query)[-1]) ** -0.5
    aten = torch.ops.aten
    with graph.inserting_before(node):
        scores = graph.call_function(aten.matmul.default, (
            graph.call_function(aten.mul.Scalar, (query, scale)),
            graph.call_function(aten.transpose.int, (key, -2, -1))))
        out = graph.call_function(aten.matmul.default, (graph.call_function(aten.softmax.int, (scores, -1)), value))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _shape(node: torch.fx.Node) -> torch.Size:
    """A graph value's traced shape; quantize/dequantize nodes a quantizer inserted carry none, so it is read from the
    value they (de)quantize, which has the same shape."""
    while "val" not in node.meta:
        source = node.args[0] if node.args and "quantize" in str(node.target) else None
        if not isinstance(source, torch.fx.Node):
            raise LiteRTError(f"LiteRT cannot convert the attention op: the shape of {node.name} is not recorded in "
                              f"the graph; export without LiteRT (export_tflite=false / --no-tflite)")
        node = source
    return node.meta["val"].shape


def _quant_config() -> Any:
    """litert-torch's PT2E static-int8 mode. The graph was prepared by our own quantizer (train.quant.backend), whose
    choices the quantize/dequantize nodes carry; this object only tells the converter they are static."""
    pt2e = require("litert_torch.quantize.pt2e_quantizer")
    config = require("litert_torch.quantize.quant_config")
    quantizer = pt2e.PT2EQuantizer().set_global(pt2e.get_symmetric_quantization_config(is_per_channel=True))
    return config.QuantConfig(pt2e_quantizer=quantizer)


def write_tflite(model: nn.Module, path: Path, img_size: int, *, what: str, int8: bool = False) -> None:
    """Convert `model` (float; with `int8`, a converted PT2E graph made with `fold_quantize=False`) to a batch-1 NHWC
    `.tflite` at `path`. Raises `LiteRTError` naming the op that stopped the conversion (`what` names the model)."""
    litert_torch = require("litert_torch")
    sample = torch.randn(1, img_size, img_size, 3)
    try:
        with _quiet_converter(), quiet_native_stderr():
            edge = litert_torch.convert(_channels_last(explicit_attention(model)), (sample,),
                                        quant_config=_quant_config() if int8 else None)
            edge.export(str(path))
    except Exception as e:  # noqa: BLE001 - any converter failure becomes the user's message, naming the op
        raise LiteRTError(f"LiteRT cannot convert {what}: {blocking_op(e)}; the other runtimes' files are "
                          f"unaffected. Keep that op out of the network, or export without LiteRT "
                          f"(export_tflite=false / --no-tflite)") from None


def blocking_op(error: BaseException) -> str:
    """The op a converter error names (e.g. `aten.erfinv.default`, and where the network calls it), else the
    error's first line."""
    text = str(error)
    op = re.search(r"(?:Lowering not found|not supported|unsupported|failed to legalize)[^\n]*?"
                   r"((?:aten|prims|quantized_decomposed|torchao)\.[\w.]+|'[\w.]+' op|tfl\.\w+|stablehlo\.\w+)",
                   text, flags=re.IGNORECASE) or re.search(r"((?:aten|prims)\.[\w.]+)", text)
    where = re.findall(r'File "[^"]+", line \d+, in \w+\n\s*([^\n]+)', text)  # innermost frame last
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if op is None:
        return f"{type(error).__name__}: {first[:300]}"
    called = f" (called as `{where[-1].strip()[:120]}`)" if where else ""
    return f"the op {op.group(1)} stopped it{called}: {first[:200]}"


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """LiteRT's C++ side writes straight to the process's stderr (absl's "Estimated count of arithmetic ops", "INFO:
    Created TensorFlow Lite XNNPACK delegate for CPU." at every interpreter), as ExecuTorch's runtime does when a
    probed batch does not fit: send file descriptor 2 elsewhere meanwhile, so a run's console keeps its one line per
    event. Errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _quiet_converter:
    """litert-torch prints a progress line per conversion stage (a rich console) and logs one line per op it lowers
    through JAX on the root logger: keep the export's own log readable (errors still raise)."""

    def __enter__(self) -> None:
        self._console = require("litert_torch.progress").console
        self._quiet, self._console.quiet = self._console.quiet, True
        # jax (its lowerings) says at INFO that this machine has no TPU
        self._loggers = [logging.getLogger(n) for n in ("litert_torch", "jax._src.xla_bridge")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        self._root_filter = _DropConverterChatter()
        logging.getLogger().addFilter(self._root_filter)

    def __exit__(self, *exc: object) -> None:
        self._console.quiet = self._quiet
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
        logging.getLogger().removeFilter(self._root_filter)


class _DropConverterChatter(logging.Filter):
    """Root-logger lines of litert-torch: one per op lowered through JAX, and 'converted in training mode' for every
    PT2E graph (an exported graph keeps that flag; it is in eval mode)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith("Use JAX lowering") and "converted in training mode" not in message


# ------------------------------------------------------------------------------------------------ running


class TfliteRunner:
    """A `.tflite` file in LiteRT's interpreter (XNNPACK delegate on, as shipped), called like a network: NCHW float
    normalised images in, float logits out. The batch-1 graph runs image by image; int8 input and output tensors
    are quantized / dequantized with the scale and zero point the file declares."""

    name = "tflite"

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        interpreter = require("ai_edge_litert.interpreter")
        with quiet_native_stderr():
            self.interpreter = interpreter.Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        self.input, self.output = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        if int(self.input["shape"][0]) != 1 or int(self.input["shape"][-1]) != 3:
            raise LiteRTError(f"{path}: expected a batch-1 NHWC image input, got shape {list(self.input['shape'])}")

    def _quantize(self, image: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return image
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(image / scale) + zero, info.min, info.max).astype(dtype)

    def _dequantize(self, out: np.ndarray) -> np.ndarray:
        if out.dtype == np.float32:
            return out
        scale, zero = self.output["quantization"]
        return (out.astype(np.float32) - zero) * scale

    def run_nhwc(self, image: np.ndarray) -> np.ndarray:
        """One NHWC image `[1, H, W, 3]` (float) -> logits `[1, classes]` (float)."""
        self.interpreter.set_tensor(self.input["index"], self._quantize(image))
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]))

    def __call__(self, x: Tensor) -> Tensor:
        images = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        return torch.from_numpy(np.concatenate([self.run_nhwc(np.ascontiguousarray(images[i:i + 1]))
                                                for i in range(images.shape[0])]))


def input_description(runner: TfliteRunner) -> str:
    """What the file takes, for metrics.json (e.g. `NHWC float32 [1, 224, 224, 3], normalised`)."""
    details = runner.input
    dtype = np.dtype(details["dtype"]).name
    quant = ""
    if dtype != "float32":
        scale, zero = details["quantization"]
        quant = f", quantized with scale {scale:.6g} and zero point {zero}"
    return f"{INPUT_LAYOUT} {dtype} {list(map(int, details['shape']))}, normalised{quant}"


def latency_ms(path: str | os.PathLike, img_size: int, *, threads: int, repeats: int = REPEATS) -> float:
    """Median ms of one batch-1 run of the file at `threads` interpreter threads."""
    runner = TfliteRunner(path, threads=threads)
    image = np.random.default_rng(0).standard_normal((1, img_size, img_size, 3), dtype=np.float32)
    for _ in range(WARMUP):
        runner.run_nhwc(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run_nhwc(image)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def tflite_latencies(path: str | os.PathLike, img_size: int, *, prefix: str = "") -> dict[str, float]:
    """{`<prefix>tflite_1thread`, `<prefix>tflite_all_threads`}: batch-1 ms on one thread and on every CPU this
    process may use (the names onnxruntime's figures have: train.nets.latency)."""
    return {f"{prefix}tflite_1thread": latency_ms(path, img_size, threads=1),
            f"{prefix}tflite_all_threads": latency_ms(path, img_size, threads=default_workers())}


# ------------------------------------------------------------------------------------------------ delegation


@dataclass
class Delegation:
    """Where LiteRT runs a file's ops: `outside_xnnpack` (ops LiteRT's own kernels run because XNNPACK did not take
    them, by op), `partitions` (XNNPACK subgraphs: each boundary is a hand-over between XNNPACK and LiteRT's kernels),
    and, for int8 files, `float_ops` (arithmetic that runs in float between a DEQUANTIZE and a QUANTIZE, by op)."""

    outside_xnnpack: dict[str, int] = field(default_factory=dict)
    partitions: int = 0
    float_ops: dict[str, int] = field(default_factory=dict)


# Ops that move or convert tensors rather than compute with them.
_NOT_ARITHMETIC = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "TRANSPOSE", "PAD", "SQUEEZE", "DELEGATE", "CONCATENATION"}


def delegation(path: str | os.PathLike) -> Delegation:
    """Read from the interpreter's node list after XNNPACK took what it could. The interpreter appends one DELEGATE
    node per XNNPACK partition and keeps the replaced nodes in its list; which original nodes still run is found by
    walking back from the graph's outputs: a tensor a DELEGATE node produces comes from XNNPACK, any other from the
    original node that writes it, which then runs outside XNNPACK."""
    runner = TfliteRunner(path, threads=1)
    ops = runner.interpreter._get_ops_details()  # noqa: SLF001 - the Python API's only view of the node list
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    producer = {int(t): op for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]}
    from_delegate = {int(t) for op in delegates for t in op["outputs"]}
    wanted = [int(d["index"]) for d in runner.interpreter.get_output_details()]
    wanted += [int(t) for op in delegates for t in op["inputs"] if t >= 0]
    running: dict[int, dict] = {}
    while wanted:
        tensor = wanted.pop()
        op = producer.get(tensor)
        if tensor in from_delegate or op is None or op["index"] in running:
            continue
        running[op["index"]] = op
        wanted += [int(t) for t in op["inputs"] if t >= 0]
    outside = _count(op["op_name"] for op in running.values())
    floats = _count(op["op_name"] for op in ops if op["op_name"] not in _NOT_ARITHMETIC and _computes_in_float(op))
    int8_file = any(op["op_name"] == "DEQUANTIZE" for op in ops)
    return Delegation(outside, len(delegates), floats if int8_file else {})


def _computes_in_float(op: dict) -> bool:
    return any(t == np.float32 for t in op["operand_types"][:1])


def _count(names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def as_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in ops.items())

