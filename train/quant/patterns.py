"""Export each of torchao's pattern graphs once per process instead of at every use.

torchao (and ExecuTorch's XNNPACK quantizer) match subgraphs against small pattern functions that they turn into aten
graphs with a strict `torch.export` each time one is needed: about 100 exports (0.3 s each on a CPU) per
`convert_pt2e`, a dozen per `prepare_qat_pt2e` and two per train/eval switch of a prepared graph, although a
pattern's graph depends only on the function and the shapes and dtypes of its example inputs. Memoizing
`_get_aten_graph_module_for_pattern` on exactly that makes a convert 5x faster and a train/eval switch instant;
callers get a deep copy, so they may rewrite it as before. A pattern whose identity cannot be hashed is exported as
before. If a release renames the function, nothing is patched and everything runs at the old speed.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch

NAME = "_get_aten_graph_module_for_pattern"
_cache: dict[Any, torch.fx.GraphModule] = {}


def _key_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_key_of(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key_of(v)) for k, v in value.items()))
    return value


def _pattern_key(pattern: Callable, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> Any:
    fn = getattr(pattern, "fn", pattern)  # torchao's WrapperModule holds the function
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    cells = tuple(_key_of(c.cell_contents) for c in (fn.__closure__ or ()))
    key = (code, cells, _key_of(tuple(example_inputs)), bool(is_cuda), _key_of(kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def cache_pattern_graphs() -> None:
    """Patch every loaded module that imported torchao's pattern exporter (idempotent)."""
    utils = sys.modules.get("torchao.quantization.pt2e.utils")
    original = getattr(utils, NAME, None)
    if original is None or getattr(original, "_memoized", False):
        return

    def memoized(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _cache:
            _cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_cache[key])

    memoized._memoized = True
    for module in list(sys.modules.values()):
        if getattr(module, NAME, None) is original:
            setattr(module, NAME, memoized)
