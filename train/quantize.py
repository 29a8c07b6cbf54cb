"""Quantization-aware training: turns the float network into a fake-quant one before training (torchao PT2E)."""

from __future__ import annotations

from torch import nn


def prepare_qat(model: nn.Module, *, enabled: bool) -> nn.Module:
    if enabled:
        raise NotImplementedError(
            "qat=true composes, but quantization-aware training (torchao PT2E, int8 export) is not implemented yet; "
            "it lands with its own issue. Run without qat=true for now."
        )
    return model
