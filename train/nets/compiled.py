"""torch.compile for a network, in place, and the plain network back for export.

`nn.Module.compile` compiles the module's call and leaves the module itself alone: its parameters, buffers and
`state_dict` keys are the eager network's (torch.compile's `OptimizedModule` wrapper would prefix every key with
`_orig_mod.`). So a compiled run's checkpoints are the eager run's files (either resumes from the other), the EMA
copy and DDP see ordinary parameters, and export traces the same module once its compiled call is dropped.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._triton import has_triton

# torch.compile's modes (torch.compile's docstring); `default` balances compile time and speed.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_network(model: nn.Module, mode: str) -> nn.Module:
    """`model`, its calls compiled by torch.compile (inductor) in `mode`; compiling happens at the first call."""
    model.compile(mode=mode)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def plain_network(model: nn.Module) -> nn.Module:
    """`model` with its eager call back (in place): what torch.export, ONNX and the export's own evaluation run.
    `nn.Module.compile` has no public inverse; its whole effect is this one attribute (torch/nn/modules/module.py)."""
    model._compiled_call_impl = None
    return model


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompilation adds one)."""
    return int(counters["stats"]["unique_graphs"])


def compiler_problem(on_gpu: bool) -> str | None:
    """What keeps inductor from generating code here, with the fix; None when nothing does. On a GPU it writes
    Triton kernels; on the CPU, C++ that a host compiler builds."""
    if on_gpu:
        return None if has_triton() else (
            "compile=true on a GPU needs Triton (torch's inductor writes Triton kernels), which this environment "
            f"lacks (torch {torch.__version__}): pip install triton matching torch, or compile=false")
    if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"):
        return None
    return ("compile=true on the CPU needs a C++ compiler (torch's inductor builds C++ kernels) and none is on PATH "
            "(c++, g++, clang++): install one (apt install g++), or compile=false")
