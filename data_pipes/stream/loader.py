"""The sample stream: exact, deterministic, resumable batches from WebDataset shards.

`ShardStream` (an IterableDataset) yields whole batches built inside the loader workers; `ShardLoader` (a
DataLoader with `batch_size=None`) tells the workers which epoch and which already-consumed batches to skip
through shared memory, and knows which samples the trainer has consumed after any number of batches. The plan
itself (who reads what, in which order) is in `stream_plan`; reading a run of samples from a shard is in
`stream_read`.

Guarantees: every rank yields the same number of batches whatever the shard sizes; a training epoch reads each
sample at most once (the N mod world*batch left over change every epoch); validation covers every sample exactly
once over all ranks (padding has `valid=False`); a sample that cannot be decoded is replaced inside its batch
by a good one (`valid=False`) and counted in `bad`, so shapes never change.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from data_pipes.errors import UserError
from data_pipes.shards.metadata import MAKE_SHARDS_HINT
from data_pipes.shards.read import ShardFiles, ShardIndex
from data_pipes.stream.plan import (
    BatchRef,
    EpochLayout,
    WindowPlan,
    augment_seed,
    deliver,
    progress_of,
    resume_streams,
    train_batches_per_rank,
    val_batches_per_rank,
    window_size,
)

Transform = Callable[[bytes], np.ndarray]
_MAX_REPORTED = 20  # bad samples named in an error; the rest are counted


class DataError(UserError, RuntimeError):
    """The shards hold more unreadable samples than `max_bad_fraction` allows, or cannot feed a batch at all."""


class ShardStream(IterableDataset):
    """One rank's batches of one split, planned at the sample level (see `stream_plan`).

    `shards` are (path, sample count) in metadata order; `transform` is any picklable callable turning the raw
    `jpg` bytes into an HWC uint8 RGB array, or a dict of them collated under their names (`image` first; it may
    raise for a corrupt image). `train=True` shuffles (shards per
    epoch, samples within windows of `shuffle_window`) and drops the remainder; `train=False` reads in dataset
    order and pads instead.
    """

    def __init__(
        self,
        shards: Sequence[tuple[str | Path, int]],
        *,
        transform: Transform,
        batch_size: int,
        train: bool,
        seed: int,
        shuffle_window: int,
        max_bad_fraction: float,
        rank: int = 0,
        world_size: int = 1,
        num_classes: int | None = None,
        split: str = "",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.paths = tuple(str(p) for p, _ in shards)
        self.lengths = tuple(int(n) for _, n in shards)
        self.num_samples = sum(self.lengths)
        self.transform, self.batch_size, self.train, self.seed = transform, batch_size, train, seed
        self.rank, self.world_size, self.num_classes = rank, world_size, num_classes
        self.max_bad_fraction, self.split = max_bad_fraction, split or ("train" if train else "val")
        self.window = window_size(batch_size, shuffle_window)
        self._check_size()
        self.window_batches = self.windows(0).batches
        # Written by the main process before each iter(); read by (persistent) workers when their iterator starts.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._done = multiprocessing.RawArray("q", max(1, len(self.window_batches)))
        self._files: ShardFiles | None = None
        self._reserve: tuple[np.ndarray, int] | None = None

    def _check_size(self) -> None:
        if self.num_samples == 0:
            raise DataError(f"split '{self.split}' has no samples; re-make the shards with: {MAKE_SHARDS_HINT}")
        if self.train and train_batches_per_rank(self.num_samples, self.world_size, self.batch_size) == 0:
            raise DataError(
                f"split '{self.split}' has {self.num_samples} samples: fewer than world_size x batch_size = "
                f"{self.world_size} x {self.batch_size}, so no rank gets a full batch. Use a smaller batch size."
            )

    def __len__(self) -> int:
        return sum(self.window_batches)

    def windows(self, epoch: int) -> WindowPlan:
        """This rank's windows of `epoch`, each made when it is read (one window in memory, not the epoch)."""
        return WindowPlan(self.num_samples, self.world_size, self.rank, self.batch_size, self.window,
                          train=self.train, seed=self.seed, epoch=epoch)

    def layout(self, epoch: int) -> EpochLayout:
        return EpochLayout.build(self.lengths, self.seed, epoch, shuffle=self.train)

    def planned_batches(
        self, epoch: int, num_workers: int = 1, done: Sequence[int] | None = None
    ) -> list[list[tuple[int, int, bool]]]:
        """(shard, sample index in the shard, valid) of every batch an iteration yields, in delivery order."""
        layout, windows, size = self.layout(epoch), self.windows(epoch), self.batch_size
        batches = []
        for w, b in deliver(resume_streams(self.window_batches, max(1, num_workers), done)):
            part = slice(b * size, (b + 1) * size)
            batches.append([(*layout.locate(p), v) for p, v in zip(windows[w].positions[part], windows[w].valid[part])])
        return batches

    def set_position(self, epoch: int, done: Sequence[int] | None = None) -> None:
        """Where the next iteration starts: `epoch`, skipping `done[w]` batches of window w. Main process only."""
        done = list(done) if done else [0] * len(self.window_batches)
        if len(done) != len(self.window_batches):
            raise ValueError(f"progress has {len(done)} windows, this stream has {len(self.window_batches)}")
        self._epoch.value = epoch
        self._done[: len(done)] = done

    def position(self) -> tuple[int, list[int]]:
        return int(self._epoch.value), list(self._done[: len(self.window_batches)])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, done = self.position()
        stream = resume_streams(self.window_batches, workers, done)[worker]
        if self._files is None:
            self._files = ShardFiles()
        return self._batches(epoch, stream, in_worker=info is not None)

    def _batches(self, epoch: int, stream: list[BatchRef], in_worker: bool) -> Iterator[dict]:
        layout, windows = self.layout(epoch), self.windows(epoch)
        health = _Health(self.max_bad_fraction * self.num_samples, self.split)
        for w, refs in groupby(stream, key=lambda ref: ref[0]):
            batches = [b for _, b in refs]
            first, end = batches[0] * self.batch_size, (batches[-1] + 1) * self.batch_size
            items = list(zip(windows[w].positions[first:end], windows[w].valid[first:end]))
            records = self._read(layout, items, health)
            for i, b in enumerate(batches):
                chunk = items[i * self.batch_size : (i + 1) * self.batch_size]
                if not self.train:
                    yield self._build(chunk, records, health, layout)
                    continue
                # Augmentation draws depend on the batch only, not on the worker that makes it. In the main process
                # (num_workers=0) the training's own RNG stream (dropout, mixup) is put back afterwards, so loading
                # a batch draws nothing from it, as with workers.
                with _batch_seeded(augment_seed(self.seed, epoch, self.rank, w, b), keep_global=not in_worker):
                    batch = self._build(chunk, records, health, layout)
                yield batch
            del records  # a worker holds one window's raw bytes at a time

    def _read(self, layout: EpochLayout, items: list[tuple[int, bool]], health: _Health) -> dict[int, tuple]:
        """Raw samples of the positions in `items`: position -> (label, sample dict or failure reason)."""
        wanted = {p for p, _ in items}
        records: dict[int, tuple] = {}
        for shard, first, end, position in layout.runs(min(wanted), max(wanted) + 1):
            path = self.paths[shard]
            health.check_shard(path, self._files.get(path), self.lengths[shard])
            name = Path(path).name
            for local, sample in self._files.read_run(path, first, end):
                if position + local - first in wanted:
                    records[position + local - first] = (f"{name}#{local}", sample)
        return records

    def _decode(self, record: tuple) -> tuple[str, np.ndarray | None, int, str | None]:
        """(key, image, target, failure reason) of one raw sample."""
        label, sample = record
        if isinstance(sample, str):
            return label, None, -1, sample
        key = sample.get("__key__", label)
        try:
            if "jpg" not in sample or "cls" not in sample:
                raise KeyError(f"sample has members {sorted(k for k in sample if not k.startswith('__'))}, "
                               "needs jpg and cls")
            target = int(sample["cls"])
            if self.num_classes is not None and not 0 <= target < self.num_classes:
                raise ValueError(f"class {target} is outside 0..{self.num_classes - 1}")
            return key, self.transform(sample["jpg"]), target, None
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad sample, counted and reported
            return key, None, -1, f"{type(e).__name__}: {e}"

    def _build(self, chunk: list[tuple[int, bool]], records: dict, health: _Health, layout: EpochLayout) -> dict:
        images, targets, keys, valid, bad_keys = [], [], [], [], []
        for position, is_valid in chunk:
            record = records.get(position) or (f"#{position}", "not read")
            key, image, target, reason = self._decode(record)
            if reason is not None and is_valid:  # padding repeats a real sample: its failure is counted there
                bad_keys.append(health.bad(f"{record[0].split('#')[0]}:{key}: {reason}"))
            images.append(image)
            targets.append(target)
            keys.append(key)
            valid.append(is_valid and reason is None)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            self._reserve = (images[good[-1]], targets[good[-1]])
        elif self._reserve is None:
            self._reserve = self._find_reserve(layout, bad_keys)
        stand_ins = [(images[i], targets[i]) for i in good] or [self._reserve]
        missing = [i for i, image in enumerate(images) if image is None]
        for n, i in enumerate(missing):
            images[i], targets[i] = stand_ins[n % len(stand_ins)]
        return _collate(images, targets, keys, valid, bad_keys)

    def _find_reserve(self, layout: EpochLayout, bad_keys: list[str]) -> tuple[np.ndarray, int]:
        """A decodable sample to stand in for a batch with none: the first one found, shard by shard."""
        for shard in range(len(self.paths)):
            path = self.paths[shard]
            for local, sample in self._files.read_run(path, 0, min(8, self.lengths[shard])):
                _, image, target, reason = self._decode((f"{Path(path).name}#{local}", sample))
                if reason is None:
                    return image, target
        raise DataError(f"no sample of split '{self.split}' can be decoded; first failures: {bad_keys[:5]}")


class _Health:
    """Counts one worker's bad samples; stops early once they alone exceed the whole epoch's allowance."""

    def __init__(self, allowance: float, split: str) -> None:
        self.allowance, self.split, self.count, self.names = allowance, split, 0, []

    def bad(self, name: str) -> str:
        self.count += 1
        if len(self.names) < _MAX_REPORTED:
            self.names.append(name)
        if self.count > self.allowance:
            raise DataError(
                f"more than data.max_bad_fraction of split '{self.split}' cannot be read: {self.count} bad samples "
                f"(allowed {self.allowance:.0f}). First ones (shard:key: reason): {self.names}. Fix or re-make those "
                f"shards ({MAKE_SHARDS_HINT}), or raise data.max_bad_fraction to skip them."
            )
        return name

    def check_shard(self, path: str, index: ShardIndex, length: int) -> None:
        """A shard missing more samples than the whole allowance stops the run now, naming the file."""
        missing = length - len(index.offsets)
        if missing > self.allowance:
            why = index.error or f"the tar ends after {len(index.offsets)} of the {length} samples _info.json lists"
            raise DataError(
                f"cannot read shard {path}: {why}. {missing} of its {length} samples are unreadable, more than "
                f"data.max_bad_fraction allows ({self.allowance:.0f} samples of split '{self.split}'). The file is "
                f"missing, truncated or not a tar: copy it again from the source, or re-make the shards with: "
                f"{MAKE_SHARDS_HINT}. To train without it, raise data.max_bad_fraction."
            )


@contextlib.contextmanager
def _batch_seeded(seed: int, *, keep_global: bool):
    """Python's, numpy's and torch's global RNGs seeded for one batch; with `keep_global`, restored afterwards."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if keep_global else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: augmentation runs on the CPU, CUDA's is left
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """[B,H,W,3] uint8, allocated in shared memory inside a worker so that sending it to the main process copies
    nothing (what torch's default_collate does)."""
    shape = images[0].shape
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape != shape or shape[-1] != 3:
            raise TypeError(f"the transform must return same-sized HWC uint8 RGB arrays, got {image.dtype} "
                            f"{image.shape} next to {shape}")
    out = torch.empty((len(images), *shape), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(images, out=out.numpy())
    return out


def _collate(images: list, targets: list, keys: list, valid: list, bad_keys: list) -> dict:
    # A transform returns one array, or a dict of arrays (e.g. `image` and the teacher's `teacher_image`).
    views = {"image": images} if not isinstance(images[0], dict) else {k: [v[k] for v in images] for k in images[0]}
    return {
        # NHWC memory seen as NCHW: channels_last without a copy.
        **{name: _stack(arrays).permute(0, 3, 1, 2) for name, arrays in views.items()},
        "target": torch.tensor(targets, dtype=torch.int64),
        "valid": torch.tensor(valid, dtype=torch.bool),
        "key": keys,
        "bad": torch.tensor(len(bad_keys), dtype=torch.int64),
        "bad_keys": bad_keys,
    }


# What a cluster sends to every process of a job (slurmstepd signals the whole process tree, loader workers too):
# the training process checkpoints on them at its next safe step (train/requeue.py), which needs its workers alive.
JOB_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def _kill_loader_workers_at_exit() -> None:
    """Loader workers still alive when the main process exits (a run that raised mid-epoch, its iterator held by a
    traceback) must not keep it from exiting. multiprocessing's own exit hook, which runs after this one, SIGTERMs
    its daemonic children and waits for them, and loader workers ignore SIGTERM (init_loader_worker). So this hook
    does that first, and SIGKILLs the children still alive a moment later (a worker that ignores SIGTERM, or one
    still starting that will)."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    # torch's SIGCHLD handler would raise "worker killed by signal" into this hook: the process is leaving anyway.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=0.5)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)


# multiprocessing.util registers its exit hook when it is first imported: import it before registering ours, so that
# ours (atexit runs hooks last-registered first) kills the workers before that hook waits for them.
import multiprocessing.util  # noqa: E402

atexit.register(_kill_loader_workers_at_exit)


def init_loader_worker(worker_id: int) -> None:
    # torch runs one thread per loader worker; OpenCV (resizes, albumentations kernels) would otherwise start a
    # thread pool per worker sized to the whole machine, and the workers' pools then fight over the cores.
    cv2.setNumThreads(0)
    # A worker ends with its loader (or when it sees its parent gone); the job's signals are the trainer's to act on.
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader(DataLoader):
    """A DataLoader over a `ShardStream` (`batch_size=None`: workers collate) that positions every iteration.

    Each `iter()` asks `position()` for (epoch, batches consumed per window) (None: use `set_epoch`'s epoch from
    its start), hands it to the workers, and remembers the delivery order, so `progress_after(k)` can say which
    batches are consumed once the trainer has trained on k batches of the epoch. `len()` is batches per rank.
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        position: Callable[[], tuple[int, Sequence[int] | None] | None] | None = None,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=init_loader_worker,
            # Each iter() draws the workers' base seed; from the global generator, that draw would shift what
            # dropout and mixup draw next, and a resumed run starts its iterator at another point than the run it
            # continues. (The workers reseed per batch from the stream's own seed anyway.)
            generator=torch.Generator().manual_seed(stream.seed),
        )
        self._position = position
        self._epoch = 0
        self._iteration: tuple[int, list[int], list[BatchRef]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def state_dict(self) -> dict:
        """Empty: the position is checkpointed by `ShardDataModule.state_dict`, from the fit loop's count of
        trained batches (this loader only knows fetched ones). Defined so Lightning sees a resumable loader."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore here (see `state_dict`)."""

    @property
    def current_epoch(self) -> int | None:
        return None if self._iteration is None else self._iteration[0]

    def __iter__(self):
        where = self._position() if self._position is not None else None
        epoch, done = where if where is not None else (self._epoch, None)
        self.dataset.set_position(epoch, done)
        epoch, done = self.dataset.position()
        order = deliver(resume_streams(self.dataset.window_batches, max(1, self.num_workers), done))
        self._iteration = (epoch, done, order)
        return self._stop_workers_on_error(super().__iter__())

    def _stop_workers_on_error(self, iterator):
        # Left to garbage collection, torch's worker shutdown can find its queues already finalised and wait
        # 5 s per worker before killing them; stop them as soon as an error leaves the loader instead.
        try:
            yield from iterator
        except (Exception, KeyboardInterrupt):
            if isinstance(iterator, _MultiProcessingDataLoaderIter):
                iterator._shutdown_workers()
                self._iterator = None  # a persistent loader starts fresh workers if iterated again
            raise

    def planned_order(self) -> list[BatchRef]:
        """(window, batch) of each batch the current iteration yields, in delivery order."""
        return [] if self._iteration is None else list(self._iteration[2])

    def progress_after(self, epoch: int, batches: int) -> list[int]:
        """Batches consumed per window once `batches` of `epoch` (counted from the epoch's start, across resumes)
        are trained on. Exact for the current iteration's epoch; for another epoch, the fresh plan's."""
        window_batches = self.dataset.window_batches
        if self._iteration is not None and self._iteration[0] == epoch:
            _, done, order = self._iteration
        else:
            done, order = [0] * len(window_batches), deliver(resume_streams(window_batches, max(1, self.num_workers)))
        extra = progress_of(window_batches, order[: max(0, batches - sum(done))])
        return [a + b for a, b in zip(done, extra)]


def stream_batches(num_samples: int, world_size: int, batch_size: int, train: bool) -> int:
    """Batches per rank per epoch for a split of `num_samples`."""
    if train:
        return train_batches_per_rank(num_samples, world_size, batch_size)
    return val_batches_per_rank(num_samples, world_size, batch_size)
