"""Sample-level epoch planning: which samples each rank and loader worker reads, in which order.

Everything here is a pure function of (shard lengths, seed, epoch, world size, batch size, window, workers), so
every rank and every loader worker computes the same plan without talking to the others, and a checkpoint only
needs to store how far into the plan training got.

Vocabulary: a *position* indexes the epoch's sample sequence (`EpochLayout`: chunks of consecutive samples, from
all shards, in a seeded order; validation: the dataset's order). A rank's positions are cut into *windows* (a
multiple of the batch size); a window is emitted in a seeded permutation and is the unit a loader worker reads.
A worker *stream* is the list of (window, batch-in-window) pairs it yields, and the DataLoader delivers the
workers' batches round-robin, skipping exhausted workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Distinct seed-sequence salts keep the chunk order and the window permutations statistically independent.
_SHARD_SALT = 0x5EED_0001
_WINDOW_SALT = 0x5EED_0002
_AUG_SALT = 0x5EED_0003

BatchRef = tuple[int, int]  # (window index, batch index inside the window)
# Consecutive samples of a shard read as one run and kept together in the epoch's order: large enough for one
# seek and one decompression-friendly read per run, small enough that a window mixes many shards.
CHUNK = 64
_ROUNDS = 4  # Feistel rounds of the chunk permutation
# Bumped whenever the same (lengths, seed, epoch) maps to other samples, so a checkpoint taken mid-epoch under an
# older order is recognised (its per-window progress means other samples now) instead of silently misread.
ORDER_VERSION = 2


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


def _round_keys(*key: int) -> tuple[int, ...]:
    return tuple(int(k) for k in np.random.SeedSequence(list(key)).generate_state(_ROUNDS, dtype=np.uint64))


def _mix(values: np.ndarray, key: int, mask: np.uint64) -> np.ndarray:
    """A keyed hash of each value (splitmix64's finaliser), cut to `mask`."""
    with np.errstate(over="ignore"):
        z = values ^ np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & mask


def _feistel_bits(n: int) -> int:
    return max(1, ((max(2, n) - 1).bit_length() + 1) // 2)


def permute(values: np.ndarray | Sequence[int], n: int, keys: tuple[int, ...]) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at `values`, without materialising it: a Feistel network on the
    smallest even power of two >= n, cycle-walked back into [0, n). O(1) memory, a few passes per value."""

    def rounds(left, right, mask):
        for key in keys:
            left, right = right, left ^ _mix(right, key, mask)
        return left, right

    return _cycle_walk(values, n, rounds)


def unpermute(values: np.ndarray | Sequence[int], n: int, keys: tuple[int, ...]) -> np.ndarray:
    """The inverse of `permute` (the same keys): the slot each value is found at."""

    def rounds(left, right, mask):
        for key in reversed(keys):
            left, right = right ^ _mix(left, key, mask), left
        return left, right

    return _cycle_walk(values, n, rounds)


def _cycle_walk(values: np.ndarray | Sequence[int], n: int, rounds) -> np.ndarray:
    """Apply the Feistel `rounds` on the halves of each value until it lands in [0, n) (a bijection of the power of
    two stays one of [0, n) when walked this way)."""
    half = _feistel_bits(n)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    y = np.asarray(values, dtype=np.uint64).copy()
    todo = np.ones(len(y), dtype=bool)
    while todo.any():
        left, right = rounds(y[todo] >> shift, y[todo] & mask, mask)
        y[todo] = (left << shift) | right
        todo = y >= np.uint64(n)
    return y.astype(np.int64)


class EpochLayout:
    """The epoch's sample sequence: epoch position -> source position (shards concatenated in metadata order) ->
    (shard, sample index in the shard).

    Shuffled (training): the source sequence, rotated by a seeded offset, is cut into chunks of `chunk` consecutive
    samples (the last one shorter), and the chunks are read in a seeded order. So a window of W consecutive epoch
    positions is W / chunk runs from all over the data (at ImageNet's ~1,250 samples a shard, each run from another
    shard), each read in one go; and because the offset moves the chunk boundaries every epoch, a sample's
    chunk-mates, its only likely batch-mates again, change too. Not shuffled (validation): the source order.
    Nothing is materialised: the chunk order is a Feistel permutation evaluated per position. Memory: the shard
    starts, O(shards) (8 KB for ImageNet's 1,000 shards), whatever the number of samples.
    """

    def __init__(self, shard_lengths: Sequence[int], seed: int, epoch: int, shuffle: bool,
                 chunk: int = CHUNK) -> None:
        self.shard_starts = np.concatenate([[0], np.cumsum(np.asarray(shard_lengths, dtype=np.int64))])
        self.num_samples = int(self.shard_starts[-1])
        self.shuffle = shuffle and self.num_samples > 0
        self.chunk = chunk
        if self.shuffle:
            n, chunks = self.num_samples, -(-self.num_samples // chunk)
            self.chunks, self.tail = chunks, n - (chunks - 1) * chunk
            self.keys = _round_keys(_SHARD_SALT, seed, epoch)
            self.offset = int(np.random.default_rng([_SHARD_SALT, seed, epoch]).integers(n))
            # The short last chunk sits at this slot: positions after it are one short chunk's length earlier.
            self.tail_slot = int(unpermute([chunks - 1], chunks, self.keys)[0])

    @classmethod
    def build(cls, shard_lengths: Sequence[int], seed: int, epoch: int, shuffle: bool) -> EpochLayout:
        return cls(shard_lengths, seed, epoch, shuffle)

    def source_positions(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return p
        c, cut = self.chunk, self.tail_slot * self.chunk
        after = p >= cut + self.tail
        slot = np.where(after, self.tail_slot + 1 + (p - cut - self.tail) // c, p // c)
        within = np.where(after, (p - cut - self.tail) % c, p - slot * c)
        chunk = permute(slot, self.chunks, self.keys)
        return (chunk * c + within + self.offset) % self.num_samples

    def locate_many(self, positions: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        q = self.source_positions(positions)
        shard = np.searchsorted(self.shard_starts, q, side="right") - 1
        return shard, q - self.shard_starts[shard]

    def locate(self, position: int) -> tuple[int, int]:
        shard, local = self.locate_many([position])
        return int(shard[0]), int(local[0])

    def runs(self, first: int, end: int) -> list[tuple[int, int, int, int]]:
        """(shard, first sample, end sample, epoch position of the first) of each run of consecutive samples of one
        shard that positions [first, end) cover, in position order."""
        if end <= first:
            return []
        positions = np.arange(first, end, dtype=np.int64)
        shard, local = self.locate_many(positions)
        # A run continues while the shard stays and the sample index goes up by one.
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        bounds = np.concatenate([[0], breaks, [len(positions)]])
        return [(int(shard[a]), int(local[a]), int(local[b - 1]) + 1, int(positions[a]))
                for a, b in zip(bounds[:-1], bounds[1:])]


def train_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank trains on per epoch: each rank gets N // world samples, the last partial batch dropped."""
    return (num_samples // world_size) // batch_size


def val_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank evaluates: ceil(N / world) positions per rank, padded up to whole batches."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def _window_permutation(seed: int, epoch: int, rank: int, index: int, length: int) -> np.ndarray:
    return np.random.default_rng([_WINDOW_SALT, seed, epoch, rank, index]).permutation(length)


class WindowPlan:
    """One rank's windows of an epoch, each made when it is read: memory is one window, not the epoch.

    Training: rank r reads block [r*P, r*P + n*B) of the epoch (P = N // world, n*B its whole batches), cut into
    windows of `window` positions, each in a seeded permutation. Validation: rank r owns positions
    [r*Q, min((r+1)*Q, N)) with Q = ceil(N / world), in dataset order, padded to whole batches with `valid=False`
    repeats of its last position (the dataset's last when it owns none): over all ranks every position once.
    """

    def __init__(self, num_samples: int, world_size: int, rank: int, batch_size: int, window: int, *, train: bool,
                 seed: int = 0, epoch: int = 0) -> None:
        self.world_size, self.rank, self.batch_size, self.window = world_size, rank, batch_size, window
        self.train, self.seed, self.epoch = train, seed, epoch
        if train:
            per_rank = num_samples // world_size
            self.base, self.real = rank * per_rank, (per_rank // batch_size) * batch_size
            self.padded = self.real
        else:
            per_rank = math.ceil(num_samples / world_size)
            self.base = min(rank * per_rank, num_samples)
            self.real = min((rank + 1) * per_rank, num_samples) - self.base
            self.padded = val_batches_per_rank(num_samples, world_size, batch_size) * batch_size
            self.pad_position = self.base + self.real - 1 if self.real else num_samples - 1
        self.batches = tuple(min(window, self.padded - offset) // batch_size
                             for offset in range(0, self.padded, window))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Window:
        offset = index * self.window
        length = min(self.window, self.padded - offset)
        if self.train:
            perm = _window_permutation(self.seed, self.epoch, self.rank, index, length)
            return Window(tuple(int(self.base + offset + p) for p in perm), (True,) * length)
        slots = range(offset, offset + length)
        return Window(tuple(self.base + i if i < self.real else self.pad_position for i in slots),
                      tuple(i < self.real for i in slots))


def train_windows(
    num_samples: int, world_size: int, rank: int, batch_size: int, window: int, seed: int, epoch: int
) -> list[Window]:
    """Rank `rank`'s training windows, all of them (`WindowPlan` makes them one at a time)."""
    plan = WindowPlan(num_samples, world_size, rank, batch_size, window, train=True, seed=seed, epoch=epoch)
    return [plan[i] for i in range(len(plan))]


def val_windows(num_samples: int, world_size: int, rank: int, batch_size: int, window: int) -> list[Window]:
    """Rank `rank`'s validation windows, all of them (see `WindowPlan`)."""
    plan = WindowPlan(num_samples, world_size, rank, batch_size, window, train=False)
    return [plan[i] for i in range(len(plan))]


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
