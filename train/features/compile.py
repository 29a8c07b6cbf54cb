"""`compile=true`: the network trains compiled by torch.compile (`compile_mode`), and ships plain.

It compiles the network in place (`train.nets.compiled`: the same parameters and checkpoint keys as eager, so a
compiled run resumes from an eager checkpoint and the other way round), watches what compiling costs and whether
anything recompiles (`CompileWatch`), and gives the export the eager network: torch.export and ONNX trace the
module, not its compiled call. An online teacher is compiled by the distillation feature, which owns it.

`qat=true` is refused: the fake-quant network rewrites its own graph when it switches between train and eval and
when it freezes batch norm (each a recompilation), and its observers branch on tensor values (a graph break at each);
a QAT fine-tune is a few epochs, run eager.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning import Callback
from omegaconf import DictConfig
from torch import nn

from data_pipes.errors import Problems
from data_pipes.shards.metadata import DatasetInfo
from train.callbacks.compile_watch import CompileWatch
from train.features.base import Feature
from train.nets.compiled import compile_network, compiler_problem, plain_network


class Compilation(Feature):
    def __init__(self, *, mode: str, qat: bool) -> None:
        self.mode, self.qat = mode, qat

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Compilation:
        return cls(mode=str(cfg.compile_mode), qat=bool(cfg.qat))

    def preflight(self, problems: Problems, *, info: DatasetInfo | None, trainer: Mapping[str, Any]) -> None:
        if self.qat:
            problems.add("compile=true with qat=true: the fake-quant network rewrites its graph at every train/eval "
                         "switch and BN freeze (each a recompilation) and its observers branch on tensor values (a "
                         "graph break each), so it trains eager: drop compile=true for the QAT fine-tune")
        accelerator = str(trainer.get("accelerator", "auto"))
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        problem = compiler_problem(on_gpu)
        if problem is not None:
            problems.add(problem)

    def wrap_network(self, model: nn.Module, *, img_size: int, info: DatasetInfo) -> nn.Module:
        return compile_network(model, self.mode)

    def callbacks(self) -> list[Callback]:
        return [CompileWatch(self.mode)]

    def shipped_network(self, trained: nn.Module, *, num_classes: int) -> nn.Module:
        return plain_network(trained)
