"""Optimizer and learning-rate schedule, built by timm from the `optim` and `sched` config groups.

Schedules are stepped every optimizer update (not every epoch), so warm-up and decay are smooth whatever the
epoch length; the number of updates per epoch comes from the data stream, which knows it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class OptimizerFactory:
    """`create_optimizer_v2` arguments; norm and bias parameters are kept out of weight decay."""

    opt: str
    lr: float
    weight_decay: float
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return create_optimizer_v2(
            model, opt=self.opt, lr=self.lr, weight_decay=self.weight_decay, filter_bias_and_bn=True, **self.kwargs
        )


@dataclass(frozen=True)
class SchedulerFactory:
    """`create_scheduler_v2` arguments, with `exponential` (lr *= decay_rate per epoch, applied per update) added."""

    sched: str
    num_epochs: int
    kwargs: dict[str, Any] = field(default_factory=dict)

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
            num_epochs=self.num_epochs,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
            **kwargs,
        )
        return scheduler


def optimizer_factory(opt: str, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> OptimizerFactory:
    return OptimizerFactory(opt=opt, lr=lr, weight_decay=weight_decay, kwargs=kwargs)


def scheduler_factory(sched: str, num_epochs: int, **kwargs: Any) -> SchedulerFactory:
    known = {"cosine", "step", "exponential", "multistep", "tanh", "poly"}
    if sched not in known:
        raise ValueError(f"sched.sched={sched!r} is not a schedule; choose one of {sorted(known)} "
                         "(e.g. sched=cosine, sched=step, sched=exponential)")
    return SchedulerFactory(sched=sched, num_epochs=num_epochs, kwargs=kwargs)
