"""The optimizers' multi-tensor paths: chosen per device, and the same update as the per-parameter loop."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from train.optim import multi_tensor_kwargs, optimizer_factory


@pytest.mark.parametrize("opt", ["adamw", "sgd", "rmsproptf"])  # conf/optim/*.yaml
def test_the_multi_tensor_update_equals_the_per_parameter_loop_bit_for_bit(opt):
    base = timm.create_model("mobilenetv3_small_050", num_classes=5)
    finals = []
    for kwargs in ({"foreach": False}, multi_tensor_kwargs(opt, torch.device("cpu"))):
        model = copy.deepcopy(base)
        optimizer = create_optimizer_v2(model, opt=opt, lr=1e-2, weight_decay=1e-4, filter_bias_and_bn=True,
                                        **kwargs)
        for step in range(5):
            torch.manual_seed(step)
            loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_cuda_gets_the_fused_kernels_where_they_exist_and_everything_else_foreach():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert multi_tensor_kwargs("adamw", cuda) == {"fused": True} == multi_tensor_kwargs("sgd", cuda)
    assert multi_tensor_kwargs("rmsproptf", cuda) == {"foreach": True}  # timm's: no fused kernel
    assert multi_tensor_kwargs("adamw", cpu) == {"foreach": True} == multi_tensor_kwargs("rmsproptf", cpu)
    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    optimizer = optimizer_factory("adamw", 1e-3, 0.05)(model)
    assert all(group["foreach"] for group in optimizer.param_groups) and not optimizer.defaults.get("fused")
    explicit = optimizer_factory("adamw", 1e-3, 0.05, foreach=False)(model)  # an optim.foreach override wins
    assert not any(group["foreach"] for group in explicit.param_groups)
