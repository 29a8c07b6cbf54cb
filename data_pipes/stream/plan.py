"""Sample-level epoch planning: which samples each rank and loader worker reads, in which order.

Everything here is a pure function of (shard lengths, seed, epoch, world size, batch size, window, workers), so
every rank and every loader worker computes the same plan without talking to the others, and a checkpoint only
needs to store how far into the plan training got.

Vocabulary: a *position* indexes the epoch's sample sequence (shards in the epoch's order, samples in tar order).
A rank's positions are cut into *windows* (a multiple of the batch size); a window is emitted in a seeded
permutation and is the unit a loader worker reads. A worker *stream* is the list of (window, batch-in-window)
pairs it yields, and the DataLoader delivers the workers' batches round-robin, skipping exhausted workers.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

# Distinct seed-sequence salts keep the shard shuffle and the window permutations statistically independent.
_SHARD_SALT = 0x5EED_0001
_WINDOW_SALT = 0x5EED_0002
_AUG_SALT = 0x5EED_0003

BatchRef = tuple[int, int]  # (window index, batch index inside the window)


@dataclass(frozen=True)
class Window:
    """Positions of one window in emitted order; `valid[i]` is False for validation padding."""

    positions: tuple[int, ...]
    valid: tuple[bool, ...]


def window_size(batch_size: int, shuffle_window: int) -> int:
    """The window length: the requested shuffle window rounded up to whole batches (at least one batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size * max(1, math.ceil(shuffle_window / batch_size))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in the epoch's reading order; the same (seed, epoch) always gives the same order."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.default_rng([_SHARD_SALT, seed, epoch])
    return [int(i) for i in rng.permutation(num_shards)]


@dataclass(frozen=True)
class EpochLayout:
    """Maps an epoch position to (shard index, sample index inside that shard)."""

    order: tuple[int, ...]
    starts: tuple[int, ...]  # first position of each shard of `order`
    num_samples: int

    @classmethod
    def build(cls, shard_lengths: Sequence[int], seed: int, epoch: int, shuffle: bool) -> EpochLayout:
        order = shard_order(len(shard_lengths), seed, epoch, shuffle)
        starts = tuple(accumulate((shard_lengths[i] for i in order), initial=0))
        return cls(order=tuple(order), starts=starts[:-1], num_samples=starts[-1])

    def locate(self, position: int) -> tuple[int, int]:
        k = bisect_right(self.starts, position) - 1
        return self.order[k], position - self.starts[k]

    def runs(self, first: int, end: int) -> list[tuple[int, int, int, int]]:
        """(shard, first local index, end local index, shard's first position) for each shard that positions
        [first, end) touch."""
        out = []
        pos = first
        while pos < end:
            k = bisect_right(self.starts, pos) - 1
            shard_end = self.starts[k + 1] if k + 1 < len(self.starts) else self.num_samples
            stop = min(end, shard_end)
            out.append((self.order[k], pos - self.starts[k], stop - self.starts[k], self.starts[k]))
            pos = stop
        return out


def train_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank trains on per epoch: each rank gets N // world samples, the last partial batch dropped."""
    return (num_samples // world_size) // batch_size


def val_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank evaluates: ceil(N / world) positions per rank, padded up to whole batches."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def _window_permutation(seed: int, epoch: int, rank: int, index: int, length: int) -> np.ndarray:
    return np.random.default_rng([_WINDOW_SALT, seed, epoch, rank, index]).permutation(length)


def train_windows(
    num_samples: int, world_size: int, rank: int, batch_size: int, window: int, seed: int, epoch: int
) -> list[Window]:
    """Rank `rank`'s training windows: block [r*P, r*P + n*B) of the epoch, cut into windows, each permuted."""
    per_rank = num_samples // world_size
    used = (per_rank // batch_size) * batch_size
    base = rank * per_rank
    windows = []
    for index, offset in enumerate(range(0, used, window)):
        length = min(window, used - offset)
        perm = _window_permutation(seed, epoch, rank, index, length)
        windows.append(Window(tuple(int(base + offset + p) for p in perm), (True,) * length))
    return windows


def val_windows(num_samples: int, world_size: int, rank: int, batch_size: int, window: int) -> list[Window]:
    """Rank `rank`'s validation windows, in dataset order, padded to whole batches with `valid=False` repeats.

    Rank r owns positions [r*Q, min((r+1)*Q, N)) with Q = ceil(N / world); over all ranks that is every position
    exactly once. Padding repeats the rank's last real position (it is read anyway), or the dataset's last sample
    when the rank owns none (more ranks than samples).
    """
    per_rank = math.ceil(num_samples / world_size)
    real = list(range(min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)))
    padded = val_batches_per_rank(num_samples, world_size, batch_size) * batch_size
    pad_position = real[-1] if real else num_samples - 1
    positions = real + [pad_position] * (padded - len(real))
    valid = [True] * len(real) + [False] * (padded - len(real))
    return [
        Window(tuple(positions[i : i + window]), tuple(valid[i : i + window])) for i in range(0, padded, window)
    ]


def augment_seed(seed: int, epoch: int, rank: int, window: int, batch: int) -> int:
    """A per-batch seed for random augmentation, so a resumed run augments a batch exactly as before."""
    state = np.random.SeedSequence([_AUG_SALT, seed, epoch, rank, window, batch]).generate_state(1)
    return int(state[0])


def _split_contiguous(count: int, parts: int) -> list[range]:
    """`count` items cut into `parts` contiguous groups whose sizes differ by at most one (first ones larger)."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + size + (1 if p < extra else 0))
    return [range(bounds[p], bounds[p + 1]) for p in range(parts)]


def fresh_streams(window_batches: Sequence[int], num_workers: int) -> list[list[BatchRef]]:
    """Each worker reads a contiguous group of windows from start to end."""
    return [
        [(w, b) for w in group for b in range(window_batches[w])]
        for group in _split_contiguous(len(window_batches), num_workers)
    ]


def deliver(streams: Sequence[Sequence[BatchRef]]) -> list[BatchRef]:
    """The order torch's DataLoader (in_order=True) yields the workers' batches: round-robin from worker 0,
    skipping exhausted workers (torch/utils/data/dataloader.py `_try_put_index` / `_next_data`)."""
    out: list[BatchRef] = []
    cursors = [0] * len(streams)
    worker = 0
    remaining = sum(len(s) for s in streams)
    while remaining:
        if cursors[worker] < len(streams[worker]):
            out.append(streams[worker][cursors[worker]])
            cursors[worker] += 1
            remaining -= 1
        worker = (worker + 1) % len(streams)
    return out


def _advance(streams: Sequence[Sequence[BatchRef]], batches: int) -> tuple[list[int], int]:
    """Per-worker batches consumed after the loader delivered `batches`, and the worker it visits next."""
    cursors = [0] * len(streams)
    worker = 0
    while batches:
        if cursors[worker] < len(streams[worker]):
            cursors[worker] += 1
            batches -= 1
        worker = (worker + 1) % len(streams)
    return cursors, worker


def progress_of(window_batches: Sequence[int], delivered: Sequence[BatchRef]) -> list[int]:
    """Batches consumed per window after `delivered` (always a prefix of each window's batches)."""
    done = [0] * len(window_batches)
    for w, _ in delivered:
        done[w] += 1
    return done


def resume_streams(
    window_batches: Sequence[int], num_workers: int, done: Sequence[int] | None = None
) -> list[list[BatchRef]]:
    """Worker streams that yield exactly the batches not in `done` (batches consumed per window).

    When `done` is where the fresh plan with this many workers stands after sum(done) batches (the usual case: the
    same worker count, or a chain of such resumes), the streams are the fresh ones, trimmed and rotated so that
    torch's round-robin, which always starts at worker 0, continues the interrupted order exactly. Otherwise (the
    worker count changed) the unconsumed batches are re-split over the workers: the same samples, another order.
    """
    fresh = fresh_streams(window_batches, num_workers)
    if not done or not any(done):
        return fresh
    if len(done) != len(window_batches) or any(d < 0 or d > n for d, n in zip(done, window_batches)):
        raise ValueError(f"resume progress {list(done)} does not fit windows of {list(window_batches)} batches")
    cursors, nxt = _advance(fresh, sum(done))
    consumed = [ref for stream, c in zip(fresh, cursors) for ref in stream[:c]]
    if progress_of(window_batches, consumed) == list(done):
        order = [(nxt + j) % num_workers for j in range(num_workers)]
        return [fresh[w][cursors[w] :] for w in order]
    # Whole windows per worker: a window read by one worker is consumed as a prefix, which `done` can describe.
    streams: list[list[BatchRef]] = [[] for _ in range(num_workers)]
    total, before = sum(n - d for n, d in zip(window_batches, done)), 0
    for w, (n, d) in enumerate(zip(window_batches, done)):
        if d < n:
            streams[min(num_workers - 1, before * num_workers // total)].extend((w, b) for b in range(d, n))
            before += n - d
    return streams
