"""How often ranks agree on a signal: a single process never runs a collective for it; ranks of a multi-process run
agree every N optimizer steps (and after validations) with one all-reduce, and all stop on the same step, even when
only one of them got the signal (a real 2-rank gloo group)."""

from __future__ import annotations

import os
import signal
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.cluster.requeue import RequeueOnSignal


class Guard:
    signals, stop_signals, launchers, requeue = [signal.SIGUSR1], [signal.SIGTERM], {}, False


class GlooStrategy:
    def __init__(self) -> None:
        self.collectives = 0

    def reduce(self, tensor, reduce_op="sum"):
        self.collectives += 1
        dist.all_reduce(tensor)
        return tensor


def first_stop(rank: int, world: int, every: int, signal_at: dict[int, int], steps: int) -> tuple[int | None, int]:
    """The step at which this rank's check says stop, and the collectives it ran, over `steps` steps."""
    callback = RequeueOnSignal("last.ckpt", guard=Guard(), check_every_n_steps=every)
    strategy = GlooStrategy() if world > 1 else None
    trainer = SimpleNamespace(world_size=world, global_step=0, strategy=strategy)
    for step in range(1, steps + 1):
        trainer.global_step = step
        if signal_at.get(rank) == step:
            callback._record(signal.SIGUSR1, None)
        for _ in range(2):  # two micro-batches per optimizer step (accumulation): still one check a step
            counts = callback.signalled(trainer, torch.device("cpu"))
            if counts is not None and sum(counts):
                return step, strategy.collectives if strategy else 0
    return None, strategy.collectives if strategy else 0


def _rank(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = first_stop(rank, world, every=5, signal_at={1: 3}, steps=12)  # only rank 1 is signalled
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_ranks_stop_on_the_same_step_when_only_one_got_the_signal_with_one_all_reduce_per_n_steps():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_rank, args=(2, port, out), nprocs=2, start_method="spawn", join=True)
    assert out[0] == out[1] == (5, 1)  # signal at step 3 on rank 1; both stop at the first check, step 5


def test_a_single_process_stops_at_the_next_step_without_any_collective():
    assert first_stop(0, 1, every=10, signal_at={0: 3}, steps=12) == (3, 0)
    assert first_stop(0, 1, every=10, signal_at={}, steps=12) == (None, 0)
