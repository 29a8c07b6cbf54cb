"""The lr schedule spans the run that actually happens: trainer.max_epochs, trainer.max_steps or
limit_train_batches, whichever ends it first."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_run

from train.builders import limited_batches
from train.optim import scheduler_factory
from train.run import train


def lrs(factory, updates_per_epoch: int, updates: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = factory(optimizer, updates_per_epoch)
    out = []
    for t in range(updates + 1):
        scheduler.step_update(num_updates=t)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("num_epochs, max_updates, ends_at", [(10, None, 100), (10, 30, 30), (None, 40, 40),
                                                               (2, 500, 20)])
def test_the_cosine_reaches_its_floor_exactly_when_the_first_limit_ends_the_run(num_epochs, max_updates, ends_at):
    factory = scheduler_factory("cosine", num_epochs, max_updates=max_updates, warmup_epochs=0, min_lr=0.01)
    lr = lrs(factory, updates_per_epoch=10, updates=ends_at)
    assert lr[0] == pytest.approx(1.0)
    assert lr[ends_at - 1] > 0.01 and lr[ends_at] == pytest.approx(0.01)  # the floor at the run's last update
    assert lr[ends_at // 2] == pytest.approx(0.505, abs=0.02)  # halfway down at half the run


def test_a_run_with_no_end_is_refused():
    with pytest.raises(ValueError, match="trainer.max_epochs or trainer.max_steps"):
        lrs(scheduler_factory("cosine", -1, max_updates=-1), updates_per_epoch=10, updates=1)


def test_limit_train_batches_caps_or_scales_the_batches_of_an_epoch_as_lightning_does():
    assert limited_batches(12, None) == 12
    assert limited_batches(12, 5) == 5 and limited_batches(12, 50) == 12
    assert limited_batches(12, 0.5) == 6 and limited_batches(12, 1.0) == 12


@pytest.mark.slow
def test_a_run_cut_by_max_steps_ends_its_cosine_at_min_lr(tmp_path, synthetic_shards):
    train(compose_run(f"run_dir={tmp_path}", f"data.root={synthetic_shards}", "data.batch_size=16",
                      "trainer.max_epochs=100", "trainer.max_steps=8", "trainer.limit_train_batches=5",
                      "trainer.log_every_n_steps=1", "sched.warmup_epochs=0", "sched.min_lr=1e-5", "optim.lr=1e-2",
                      "export=false"))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        lr = [float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    # 8 updates (2 epochs of 5 limited batches would be 10, 100 epochs far more): the lr of the 8th step is the
    # cosine's last value before its floor, not a value near the top of a 100-epoch curve.
    assert len(lr) == 8 and lr[0] == pytest.approx(1e-2)
    assert lr[-1] < 0.05 * 1e-2, lr
