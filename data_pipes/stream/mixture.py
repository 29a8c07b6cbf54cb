"""Batches mixed from several sources by weight: the distillation recipe's D1 : D2 : D3 stream.

Composition. Batch g (counted over the whole run, the same on every rank) takes its samples from slots
[g*B, (g+1)*B) of one global slot sequence, and each slot goes to a source by smooth weighted round-robin on the
integer weights: every W = sum(w) consecutive slots hold exactly w_s slots of source s. So a batch holds exactly
B*w_s/W samples of source s whenever that is whole for every source (B a multiple of W), and otherwise counts that
differ from it by less than one, the remainders carried from batch to batch: the long-run ratio is exact.

Order. Each source is read pass after pass: pass q visits every member once (the source's samples; for the
class-balanced extra data, its selection with rare classes repeated), its blocks (one per source shard) in a
seeded order, each rank a contiguous N // world share of it, shuffled in windows, as the labels-only stream reads
an epoch (`plan`). A source's i-th sample on a rank is sample i mod M of pass i // M (M = N // world), and the
samples a run has taken from it before batch g are a pure function of g, so the position of every source is
(epoch, batches trained in it), which a checkpoint stores. Rank r's loader worker k yields the batches
start + k, start + k + workers, ..., which torch's round-robin delivers in order.

What a sample is comes from the source's `ViewSource`: a fresh view drawn on the fly (online distillation), a
stored view replayed from its parameters, or a stored view's pixels, each with the teacher's stored labels when
there are any. The view is then flipped (the student's only augmentation) and resized to the student's and, when
the teacher runs online, to the teacher's resolution.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, reduce

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipes.image.decode import resize
from data_pipes.shards.read import shared_files
from data_pipes.stream.loader import DataError, _stack, init_loader_worker
from data_pipes.stream.members import Members
from data_pipes.stream.plan import CHUNK, EpochLayout, window_size

_PASS_SALT = 0x5EED_0011
_FLIP_SALT = 0x5EED_0012
_MAX_WEIGHT_DENOMINATOR = 1000


# ------------------------------------------------------------------------------------------------ composition


def integer_weights(weights: Sequence[float]) -> tuple[int, ...]:
    """Positive weights as the smallest integers in the same ratio (1 : 1 : 2 stays; 0.25 : 0.75 -> 1 : 3)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"source weights must be positive numbers, got {list(weights)}")
    fractions = [Fraction(w).limit_denominator(_MAX_WEIGHT_DENOMINATOR) for w in weights]
    scale = reduce(math.lcm, (f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = reduce(math.gcd, ints)
    return tuple(i // common for i in ints)


@lru_cache(maxsize=64)
def _period(weights: tuple[int, ...]) -> tuple[int, ...]:
    """The source of each slot of one period (sum(weights) slots): smooth weighted round-robin."""
    total, credit, out = sum(weights), [0] * len(weights), []
    for _ in range(total):
        credit = [c + w for c, w in zip(credit, weights)]
        best = max(range(len(weights)), key=lambda s: (credit[s], -s))
        credit[best] -= total
        out.append(best)
    return tuple(out)


def slots_taken(weights: tuple[int, ...], slots: int) -> list[int]:
    """How many of slots [0, slots) each source holds."""
    period = _period(weights)
    full, part = divmod(slots, len(period))
    counts = [w * full for w in weights]
    for s in period[:part]:
        counts[s] += 1
    return counts


def batch_counts(weights: tuple[int, ...], batch_size: int, batch: int) -> list[int]:
    """Samples of each source in global batch `batch`."""
    before = slots_taken(weights, batch * batch_size)
    after = slots_taken(weights, (batch + 1) * batch_size)
    return [a - b for a, b in zip(after, before)]


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Item:
    """One sample of a source: which member (index into the source's members), in which pass."""

    source: int
    member: int
    pass_: int


@dataclass(frozen=True)
class Rendered:
    """What a ViewSource makes of an item: the view (uint8 HWC), the true class (-1: unlabelled), and the teacher's
    stored top-k (ids, probabilities) when the source has them. `error` names why there is no view."""

    view: np.ndarray | None
    target: int
    key: str
    kd_ids: np.ndarray | None = None
    kd_probs: np.ndarray | None = None
    error: str | None = None


class SourceReader:
    """Reads the members of one source from its shards (`members.Members`: which sample each member is). Runs of
    consecutive samples of a shard are read in one go through the process's shared `ShardFiles` (one open file per
    shard, the most recent 64 kept, whatever the sources)."""

    def __init__(self, members: Members) -> None:
        self.members = members

    @property
    def num_members(self) -> int:
        return self.members.count

    def block_of(self, member: int) -> tuple[int, int]:
        return self.members.block_of(member)

    def read(self, members: Sequence[int]) -> dict[int, dict | str]:
        """Raw samples of `members` (member -> webdataset sample dict, or the reason it cannot be read)."""
        files = shared_files()
        unique = np.unique(np.asarray(list(members), dtype=np.int64))
        if not len(unique):
            return {}
        shard, local = self.members.locate(unique)
        out: dict[int, dict | str] = {}
        order = np.lexsort((local, shard))  # shard by shard, samples in file order
        shard, local, unique = shard[order], local[order], unique[order]
        # Runs: the same shard and the next sample (or the same one: repeated members share a read).
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) > 1)) + 1
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(unique)]])):
            path = self.members.paths[int(shard[a])]
            samples = dict(files.read_run(path, int(local[a]), int(local[b - 1]) + 1))
            for m, i in zip(unique[a:b], local[a:b]):
                out[int(m)] = samples[int(i)]
        return out


class ViewSource:
    """Turns items of one source into views; subclasses: online views, stored parameters, stored pixels."""

    reader: SourceReader
    labelled: bool

    def render(self, items: Sequence[Item]) -> list[Rendered]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ the stream


class PassOrder:
    """The members rank `rank` visits in pass `pass_` of a source, in order, made on demand.

    The pass's member sequence is ordered as an epoch of the labels-only stream orders its samples
    (`plan.EpochLayout`: chunks of `chunk` consecutive members, in a seeded order); the rank takes its contiguous
    N // world share, shuffled in windows of `window`. A source whose members repeat images (D3's rare classes)
    uses chunks of one member, or a chunk would be one image's copies side by side in a batch.
    Memory: one window's permutation, whatever the source's size (130M D3 members: still one window)."""

    def __init__(self, num_members: int, world_size: int, rank: int, seed: int, pass_: int, window: int,
                 chunk: int = CHUNK) -> None:
        self.layout = EpochLayout([num_members], seed, pass_, shuffle=True, chunk=chunk)
        self.per_rank = num_members // world_size
        self.base, self.window, self.key = rank * self.per_rank, window, (seed, pass_, rank)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.per_rank

    def _window(self, w: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != w:
            length = min(self.window, self.per_rank - w * self.window)
            self._perm = (w, np.random.default_rng([_PASS_SALT, *self.key, w]).permutation(length))
        return self._perm[1]

    def members(self, first: int, end: int) -> np.ndarray:
        """Members at indices [first, end) of the rank's order (member = position in the source's sequence)."""
        positions = []
        for w in range(first // self.window, (end - 1) // self.window + 1):
            lo, hi = max(first, w * self.window), min(end, (w + 1) * self.window)
            positions.append(self.base + w * self.window + self._window(w)[lo - w * self.window:hi - w * self.window])
        return self.layout.source_positions(np.concatenate(positions))

    def __getitem__(self, j: int) -> int:
        return int(self.members(j, j + 1)[0])


def pass_order(num_members: int, world_size: int, rank: int, seed: int, pass_: int, window: int,
               chunk: int = CHUNK) -> np.ndarray:
    """Every member of the rank's pass, in order (tests and small sources; training reads `PassOrder` lazily)."""
    order = PassOrder(num_members, world_size, rank, seed, pass_, window, chunk)
    return order.members(0, len(order)) if len(order) else np.zeros(0, dtype=np.int64)


class MixtureStream(IterableDataset):
    """One rank's mixed batches; the epoch and the batches already trained in it are set by `MixtureLoader`."""

    def __init__(
        self,
        sources: Sequence[ViewSource],
        *,
        names: Sequence[str],
        weights: Sequence[float],
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        shuffle_window: int,
        rank: int,
        world_size: int,
        student_size: int,
        student_interpolation: str,
        hflip: float,
        teacher_size: int | None = None,
        teacher_interpolation: str = "bicubic",
        top_k: int | None = None,
    ) -> None:
        if len(sources) != len(weights) or len(names) != len(sources):
            raise ValueError("one name and one weight per source")
        self.sources, self.names = tuple(sources), tuple(names)
        self.weights = integer_weights(weights)
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.rank, self.world_size = rank, world_size
        self.window = window_size(1, shuffle_window)
        self.student_size, self.student_interpolation, self.hflip = student_size, student_interpolation, hflip
        self.teacher_size, self.teacher_interpolation, self.top_k = teacher_size, teacher_interpolation, top_k
        self.counts = tuple(s.reader.num_members for s in self.sources)
        self.chunks = tuple(1 if s.reader.members.repeats else CHUNK for s in self.sources)
        for name, count in zip(self.names, self.counts):
            if count < world_size:
                raise DataError(f"kd source {name} has {count} samples, fewer than the {world_size} ranks")
        self._epoch = multiprocessing.RawValue("q", 0)
        self._start = multiprocessing.RawValue("q", 0)
        self._orders: dict[tuple[int, int], PassOrder] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_position(self, epoch: int, batches_done: int) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done {batches_done} is outside 0..{self.batches_per_epoch}")
        self._epoch.value, self._start.value = epoch, batches_done

    def position(self) -> tuple[int, int]:
        return int(self._epoch.value), int(self._start.value)

    def per_rank(self, source: int) -> int:
        return self.counts[source] // self.world_size

    def batch_items(self, epoch: int, batch: int) -> list[Item]:
        """The items of batch `batch` of `epoch` on this rank, source by source."""
        g = epoch * self.batches_per_epoch + batch
        before = slots_taken(self.weights, g * self.batch_size)
        counts = batch_counts(self.weights, self.batch_size, g)
        items = []
        for s, (first, n) in enumerate(zip(before, counts)):
            per_rank = self.per_rank(s)
            i = first
            while i < first + n:  # a batch's share of a source may run from one pass into the next
                pass_, j = divmod(i, per_rank)
                take = min(first + n - i, per_rank - j)
                items += [Item(s, int(m), pass_) for m in self._order(s, pass_).members(j, j + take)]
                i += take
        return items

    def _order(self, source: int, pass_: int) -> PassOrder:
        key = (source, pass_)
        if key not in self._orders:
            if len(self._orders) >= 2 * len(self.sources):  # a worker keeps the passes it is in, not all of them
                self._orders.pop(next(iter(self._orders)))
            seed = self.seed * 1000 + source
            self._orders[key] = PassOrder(self.counts[source], self.world_size, self.rank, seed, pass_,
                                          self.window, self.chunks[source])
        return self._orders[key]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, start = self.position()
        for batch in range(start + worker, self.batches_per_epoch, workers):
            yield self.build_batch(epoch, batch)

    def build_batch(self, epoch: int, batch: int) -> dict:
        items = self.batch_items(epoch, batch)
        rendered: list[Rendered | None] = [None] * len(items)
        for s, source in enumerate(self.sources):
            idx = [i for i, item in enumerate(items) if item.source == s]
            if idx:
                for i, r in zip(idx, source.render([items[i] for i in idx])):
                    rendered[i] = r
        flips = np.random.default_rng([_FLIP_SALT, self.seed, epoch, self.rank, batch]).random(len(items))
        return self._collate(items, rendered, flips < self.hflip)

    def _collate(self, items: list[Item], rendered: list[Rendered], flips: np.ndarray) -> dict:
        good = [i for i, r in enumerate(rendered) if r.error is None]
        if not good:
            raise DataError(f"no sample of a kd batch could be made; first failures: "
                            f"{[r.error for r in rendered[:5]]}")
        bad_keys = [f"{self.names[items[i].source]}:{r.key}: {r.error}" for i, r in enumerate(rendered)
                    if r.error is not None]
        stand_in = [rendered[good[n % len(good)]] if r.error is not None else r
                    for n, r in enumerate(rendered)]
        student, teacher = [], []
        for r, flip in zip(stand_in, flips):
            # Resize, then flip the (smaller) result: the resampling filters are symmetric, so this is the flipped
            # view resized, at a fraction of the cost of flipping the full view (cv2.flip, not a strided copy).
            size = self.student_size
            student.append(_flip(resize(r.view, size, size, self.student_interpolation), flip))
            if self.teacher_size is not None:
                teacher.append(_flip(resize(r.view, self.teacher_size, self.teacher_size, self.teacher_interpolation),
                                     flip))
        out = {
            "image": _stack(student).permute(0, 3, 1, 2),
            "target": torch.tensor([r.target for r in stand_in], dtype=torch.int64),
            "valid": torch.tensor([r.error is None for r in rendered], dtype=torch.bool),
            "source": torch.tensor([item.source for item in items], dtype=torch.int64),
            "key": [r.key for r in rendered],
            "bad": torch.tensor(len(bad_keys), dtype=torch.int64),
            "bad_keys": bad_keys,
        }
        if teacher:
            out["teacher_image"] = _stack(teacher).permute(0, 3, 1, 2)
        if self.top_k is not None:
            out["kd_ids"] = torch.from_numpy(np.stack([r.kd_ids for r in stand_in]).astype(np.int64))
            out["kd_probs"] = torch.from_numpy(np.stack([r.kd_probs for r in stand_in]).astype(np.float32))
        return out


class MixtureLoader(DataLoader):
    """A DataLoader over a `MixtureStream` that positions every iteration from `position()` ((epoch, batches
    already trained in it); None: the epoch set by `set_epoch`, from its start)."""

    def __init__(self, stream: MixtureStream, *, num_workers: int, pin_memory: bool, persistent_workers: bool,
                 prefetch_factor: int | None,
                 position: Callable[[], tuple[int, int] | None] | None = None) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0,
                         prefetch_factor=prefetch_factor if num_workers > 0 else None,
                         worker_init_fn=init_loader_worker)
        self._position, self._epoch = position, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def state_dict(self) -> dict:
        return {}  # the position is the datamodule's, counted from the fit loop

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore here (see `state_dict`)."""

    def __iter__(self):
        where = self._position() if self._position is not None else None
        epoch, done = where if where is not None else (self._epoch, 0)
        self.dataset.set_position(epoch, done)
        return super().__iter__()


def _flip(image: np.ndarray, flip: bool) -> np.ndarray:
    return cv2.flip(image, 1) if flip else image
