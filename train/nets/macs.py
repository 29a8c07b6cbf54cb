"""Multiply-accumulates of a network at an image size, as the papers count them."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from train.nets.shapes import eval_mode, in_chans


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of softmax(q k^T) v; key/value may carry fewer heads than the query (multi-query)."""
    *batch_and_heads, query_len, key_dim = query_shape
    key_len, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch_and_heads) * query_len * key_len * (key_dim + value_dim)


# torch's counter knows the CUDA attention kernels but not the CPU one F.scaled_dot_product_attention runs on CPU,
# so without this the MNv4 hybrids' attention matmuls would count as zero.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one image at img_size x img_size, counted by torch's FlopCounterMode.

    Counts what papers count as MAdds: convolutions (depthwise ones by their per-group weights), linear layers,
    matmuls and attention; not BatchNorm, activations, pooling or elementwise ops. The model is run once in eval
    mode under no_grad and left as it was.
    """
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros(1, in_chans(model), img_size, img_size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2
