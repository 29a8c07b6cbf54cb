"""Optimizer and learning-rate schedule, built by timm from the `optim` and `sched` config groups.

Schedules are stepped every optimizer update (not every epoch), so warm-up and decay are smooth whatever the
epoch length; the number of updates per epoch comes from the data stream, which knows it exactly.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRScaling:
    """`lr` is given for a global batch of `lr_batch`; a run with another global batch B gets lr * (B / lr_batch)
    (linear, Goyal et al. 2017: SGD and RMSprop) or lr * sqrt(B / lr_batch) (the square-root rule timm applies to
    Adam-family optimizers). Paper recipes state their global batch, so a run on fewer devices stays on recipe."""

    lr_batch: int
    rule: str
    global_batch: Callable[[], int]

    def __post_init__(self) -> None:
        if self.rule not in ("linear", "sqrt"):
            raise ValueError(f"optim.lr_scaling must be linear or sqrt, got {self.rule!r}")

    def __call__(self, lr: float) -> float:
        ratio = self.global_batch() / self.lr_batch
        scaled = lr * (ratio if self.rule == "linear" else math.sqrt(ratio))
        if ratio != 1:
            log.info("lr %.4g is for a global batch of %d; this run's is %d: lr %.4g (%s scaling)", lr,
                     self.lr_batch, self.global_batch(), scaled, self.rule)
        return scaled


@dataclass(frozen=True)
class OptimizerFactory:
    """`create_optimizer_v2` arguments; norm and bias parameters are kept out of weight decay."""

    opt: str
    lr: float
    weight_decay: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    scaling: LRScaling | None = None  # None: lr as given

    def __call__(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        lr = self.lr if self.scaling is None else self.scaling(self.lr)
        device = next(model.parameters()).device  # Lightning builds the optimizer after moving the model
        kwargs = {**multi_tensor_kwargs(self.opt, device), **self.kwargs}  # an explicit optim.fused/foreach wins
        return create_optimizer_v2(
            model, opt=self.opt, lr=lr, weight_decay=self.weight_decay, filter_bias_and_bn=True, **kwargs
        )


def multi_tensor_kwargs(opt: str, device: torch.device) -> dict[str, bool]:
    """One kernel launch for all parameters where the optimizer has it: `fused` on CUDA (AdamW, Adam, SGD), else
    `foreach` (torch's and timm's RMSpropTF, Lamb). On a MobileNet step of a few milliseconds on a GPU, the
    per-parameter loop (hundreds of small tensors) is a visible share. Each path computes the same update as the
    loop: `tests/test_optim.py` compares them bit for bit on the CPU."""
    try:
        params = inspect.signature(get_optimizer_class(opt, bind_defaults=False)).parameters
    except (ValueError, TypeError):  # an optimizer timm does not register: as it is
        return {}
    if device.type == "cuda" and "fused" in params:
        return {"fused": True}
    return {"foreach": True} if "foreach" in params else {}


@dataclass(frozen=True)
class SchedulerFactory:
    """`create_scheduler_v2` arguments, with `exponential` (lr *= decay_rate per epoch, applied per update) added."""

    sched: str
    num_epochs: int | None
    max_updates: int | None = None  # trainer.max_steps: the schedule ends at whichever limit comes first
    kwargs: dict[str, Any] = field(default_factory=dict)

    def total_updates(self, updates_per_epoch: int) -> int:
        limits = [n for n in (self.num_epochs and self.num_epochs * updates_per_epoch, self.max_updates)
                  if n is not None and n > 0]
        if not limits:
            raise ValueError("the lr schedule needs an end: set trainer.max_epochs or trainer.max_steps")
        return min(limits)

    def __call__(self, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
        kwargs = dict(self.kwargs)
        sched = self.sched
        if sched == "exponential":
            # A staircase with one-update steps is a smooth exponential: decay_t = 1 update.
            sched = "step"
            kwargs["decay_rate"] = kwargs["decay_rate"] ** (1.0 / updates_per_epoch)
            kwargs["decay_epochs"] = 1.0 / updates_per_epoch
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=sched,
            # In epochs of `updates_per_epoch` (timm's unit), possibly fractional: the run's real length in updates.
            num_epochs=self.total_updates(updates_per_epoch) / updates_per_epoch,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
            **kwargs,
        )
        return scheduler


def optimizer_factory(opt: str, lr: float, weight_decay: float, *, lr_batch: int | None = None,
                      lr_scaling: str | None = None, global_batch: Callable[[], int] | None = None,
                      **kwargs: Any) -> OptimizerFactory:
    """The `optim` group's values; with `lr_batch` set, lr follows the run's global batch (`LRScaling`)."""
    scaling = None
    if lr_batch is not None:
        if global_batch is None or lr_scaling is None:
            raise ValueError("optim.lr_batch needs optim.lr_scaling and the run's global batch")
        scaling = LRScaling(int(lr_batch), str(lr_scaling), global_batch)
    return OptimizerFactory(opt=opt, lr=lr, weight_decay=weight_decay, kwargs=kwargs, scaling=scaling)


def scheduler_factory(sched: str, num_epochs: int | None, max_updates: int | None = None,
                      **kwargs: Any) -> SchedulerFactory:
    known = {"cosine", "step", "exponential", "multistep", "tanh", "poly"}
    if sched not in known:
        raise ValueError(f"sched.sched={sched!r} is not a schedule; choose one of {sorted(known)} "
                         "(e.g. sched=cosine, sched=step, sched=exponential)")
    return SchedulerFactory(sched=sched, num_epochs=num_epochs, max_updates=max_updates, kwargs=kwargs)
