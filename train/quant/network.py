"""The fake-quantized network: a timm model exported (dynamic batch), prepared for QAT, and made to behave like an
ordinary trainable nn.Module inside Lightning.

The exported graph has none of nn.Module's train/eval behaviour, so this wrapper owns it (pytorch/pytorch#151726):
- `train(mode)` switches dropout and batch norm with torchao's `move_exported_model_to_train/eval`, then puts back
  what those helpers get wrong: every dropout's own p (they reset it to 0.5), the BN freeze, and the observers,
  which keep moving in eval unless disabled (so any evaluation, Lightning's included, leaves the scales alone).
- `freeze_bn()` stops BN running statistics (the graph's batch_norm ops run with training=False from then on);
  `freeze_observers()` stops the quantization ranges. Both are boolean buffers, so whatever copies the network's
  tensors carries them: checkpoints, EMA (which copies non-float tensors), DDP's buffer broadcast.
- Parameter and buffer names are the float model's (torch.export keeps them), so a checkpoint of this network
  loads into a freshly prepared one exactly, and its float weights load into the timm model by name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.export import Dim

from train.quant.backend import QuantError, require

log = logging.getLogger(__name__)
MAX_BATCH = 1 << 16


def _pt2e():
    return require("torchao.quantization.pt2e")


class FakeQuantNetwork(nn.Module):
    def __init__(self, model: nn.Module, *, img_size: int, quantizer, example_batch: int = 4) -> None:
        super().__init__()
        quantize = require("torchao.quantization.pt2e.quantize_pt2e")
        self.float_keys = tuple(model.state_dict())
        example = torch.randn(example_batch, 3, img_size, img_size)
        graph = export_graph(model.train(), example)
        self.graph = quantize.prepare_qat_pt2e(graph, quantizer)
        # In graph order: torchao's train/eval helpers rewrite these nodes (new names, p reset to 0.5).
        self._dropout_p = [float(n.args[1]) for n in self._nodes("dropout")]
        self.register_buffer("frozen_bn", torch.tensor(False))
        self.register_buffer("frozen_observers", torch.tensor(False))
        # A loaded state may freeze what this network has not frozen yet: the graph follows the loaded flags.
        self.register_load_state_dict_post_hook(_follow_loaded_flags)
        self.train(True)

    @property
    def bn_frozen(self) -> bool:
        return bool(self.frozen_bn)

    @property
    def observers_frozen(self) -> bool:
        return bool(self.frozen_observers)

    # --------------------------------------------------------------------------------------- nn.Module behaviour

    def forward(self, x: Tensor) -> Tensor:
        if self.training != self._graph_training:
            # Someone set the flag without calling train(): Lightning restores each module's `training` attribute
            # directly after validation. The exported graph has no modes of its own, so switch it here.
            self.train(self.training)
        return self.graph(x)

    def train(self, mode: bool = True) -> FakeQuantNetwork:
        pt2e = _pt2e()
        self.training = self._graph_training = mode
        (pt2e.move_exported_model_to_train if mode else pt2e.move_exported_model_to_eval)(self.graph)
        dropouts = self._nodes("dropout")
        if len(dropouts) != len(self._dropout_p):
            raise QuantError(f"the QAT graph has {len(dropouts)} dropout ops after a train/eval switch, not "
                             f"{len(self._dropout_p)}: this torchao version rewrites them differently")
        for node, p in zip(dropouts, self._dropout_p):
            node.args = (node.args[0], p, mode)
        if mode:
            self._bn_training(not self.bn_frozen)
        if mode and not self.observers_frozen:
            self.graph.apply(pt2e.enable_observer)
        else:
            self.graph.apply(pt2e.disable_observer)
        drop_batch_counters(self.graph)
        return self

    def freeze_bn(self) -> None:
        """BN running statistics stop changing (the normalisation keeps using them, as in eval)."""
        self.frozen_bn.fill_(True)
        if self.training:
            self._bn_training(False)
            self.graph.recompile()

    def freeze_observers(self) -> None:
        """The quantization ranges (scales, zero points) stop changing; fake quantization stays on."""
        self.frozen_observers.fill_(True)
        self.graph.apply(_pt2e().disable_observer)

    def float_state_dict(self) -> dict[str, Tensor]:
        """The float network's weights (the same names as the timm model's state_dict)."""
        state = self.graph.state_dict()
        return {k: state[k] for k in self.float_keys}

    # --------------------------------------------------------------------------------------- graph surgery

    def _nodes(self, op: str):
        return [n for n in self.graph.graph.nodes if n.op == "call_function" and op in str(n.target)]

    def _bn_training(self, training: bool) -> None:
        for node in self._nodes("batch_norm"):
            args = list(node.args)
            args[5] = training
            node.args = tuple(args)


def _follow_loaded_flags(net: FakeQuantNetwork, _incompatible_keys) -> None:
    net.train(net.training)


def drop_batch_counters(graph: torch.fx.GraphModule) -> None:
    """Erase the graph's `num_batches_tracked += 1` ops: nothing reads the counter (every BN has a momentum), yet
    they would change the state in eval and run outside XNNPACK in a .pte."""
    for node in list(graph.graph.nodes):
        target = node.args[0] if node.op == "call_function" and node.args else None
        if (str(node.target).startswith("aten.add_") and getattr(target, "op", None) == "get_attr"
                and str(target.target).endswith("num_batches_tracked") and not node.users):
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()


def export_graph(model: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """`model` traced by torch.export (dynamic batch), without stochastic depth (see `_without_drop_path`)."""
    try:
        with _without_drop_path(model):
            program = torch.export.export(model, (example,),
                                          dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
    except Exception as e:  # noqa: BLE001 - say which model could not be traced, and why
        raise QuantError(f"torch.export cannot trace {type(model).__name__} for QAT: {type(e).__name__}: "
                         f"{str(e)[:500]}") from None
    graph = program.module()
    random = sorted({str(n.target) for n in graph.graph.nodes if n.op == "call_function"
                     and any(op in str(n.target) for op in ("bernoulli", "rand", "normal", "uniform"))})
    if random:
        raise QuantError(f"{type(model).__name__} draws random numbers in its traced graph ({', '.join(random)}): a "
                         f"branch on self.training that torch.export froze, which would run in eval and in the int8 "
                         f"files too. Disable that layer for QAT (dropout is supported; stochastic depth is left out)")
    return graph


@contextlib.contextmanager
def _without_drop_path(model: nn.Module) -> Iterator[None]:
    """Stochastic depth off while `model` is traced. timm's DropPath draws its mask only while training, a branch
    torch.export freezes: a graph exported for QAT would keep drawing it after the switch to eval (every residual branch
    scaled by 1/keep, MNv4-Hybrid-M's QAT validation included) and ship `aten.bernoulli` to the runtimes (ExecuTorch
    refuses it). QAT fine-tunes a trained network for a few epochs, so it goes without; dropout, an op of the graph
    the network switches, stays. The graph is then the one a drop_path_rate of 0 gives: same observers, same files."""
    dropping = [m for m in model.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    if dropping and model.training:
        log.info("qat: stochastic depth (drop path up to %.3g) is off in the fake-quant network; dropout stays",
                 max(m.drop_prob for m in dropping))
    rates = [m.drop_prob for m in dropping]
    for m in dropping:
        m.drop_prob = 0.0
    try:
        yield
    finally:
        for m, rate in zip(dropping, rates):
            m.drop_prob = rate
