"""`ShardDataModule`: the train/val loaders of a shard directory, with the training position in checkpoints.

Resume: the datamodule's `state_dict()` (saved by Lightning under the key "ShardDataModule" of every checkpoint)
records the epoch and the batches consumed in it, counted by the fit loop (`batch_progress.current.processed`:
batches whose step ran, not batches the prefetching fetcher pulled). Lightning restores the datamodule before
`configure_optimizers`, so the position survives a `configure_optimizers` that builds the train loader early
through `trainer.estimated_stepping_batches` (the trap of Lightning #20550, which drops a stateful loader's
state). Prefer `steps_per_epoch(world_size)` for schedules anyway: it is exact and needs no loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn

from data_pipes.shards.metadata import read_info
from data_pipes.stream.health import DataHealthMonitor
from data_pipes.stream.loader import DataError, ShardLoader, ShardStream, Transform, stream_batches
from data_pipes.stream.mixture import MixtureLoader, MixtureStream
from data_pipes.stream.plan import ORDER_VERSION

__all__ = ["DataHealthMonitor", "MixtureDataModule", "ShardDataModule", "build_eval_loader"]
# Samples a loader worker of an evaluation (build_eval_loader) reads as one run of a shard.
EVAL_WINDOW = 1024

# Our loaders' __len__ is exact on every rank and worker count (that is the point of the planner).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

_STATE_FORMAT = 1


class ShardDataModule(LightningDataModule):
    """Train and val loaders over `root` (see docs/architecture.md for the batch dict).

    The metadata is read at construction, so `label_names`, `num_classes`, `num_train_samples` and
    `num_val_samples` are known before a trainer exists; rank and world size come from the trainer in `setup()`.
    """

    def __init__(
        self,
        root: str,
        *,
        batch_size: int,
        num_workers: int,
        train_transform: Transform,
        eval_transform: Transform,
        seed: int,
        shuffle_window: int,
        max_bad_fraction: float,
        val_batch_size: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
    ) -> None:
        super().__init__()
        self.info = read_info(root)
        self.root = Path(root)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle_window = num_workers, seed, shuffle_window
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.max_bad_fraction, self.pin_memory = max_bad_fraction, pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.rank, self.world_size = 0, 1
        self._resume: tuple[int, list[int]] | None = None
        self._train_loader: ShardLoader | None = None

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.info.label_names

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def num_train_samples(self) -> int:
        return self.info.split("train").num_samples

    @property
    def num_val_samples(self) -> int:
        return self.info.split("val").num_samples

    def steps_per_epoch(self, world_size: int) -> int:
        """Training batches per rank per epoch (divide by gradient accumulation for optimizer steps)."""
        return stream_batches(self.num_train_samples, world_size, self.batch_size, train=True)

    def val_steps(self, world_size: int) -> int:
        """Validation batches per rank (the same on every rank; padding included)."""
        return stream_batches(self.num_val_samples, world_size, self.val_batch_size, train=False)

    def callbacks(self) -> list[DataHealthMonitor]:
        """Callbacks a trainer using this datamodule should have: the bad-sample monitor."""
        return [DataHealthMonitor(self.max_bad_fraction)]

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size

    def _stream(self, split: str, train: bool) -> ShardStream:
        return ShardStream(
            self.info.shards(split),
            transform=self.train_transform if train else self.eval_transform,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            seed=self.seed,
            shuffle_window=self.shuffle_window,
            rank=self.rank,
            world_size=self.world_size,
            max_bad_fraction=self.max_bad_fraction,
            num_classes=self.num_classes,
            split=split,
        )

    def _loader(self, stream: ShardStream, position=None) -> ShardLoader:
        return ShardLoader(
            stream,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and self._on_accelerator(),
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            position=position,
        )

    def _on_accelerator(self) -> bool:
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type != "cpu"
        return torch.cuda.is_available()

    def train_dataloader(self) -> ShardLoader:
        self._train_loader = self._loader(self._stream("train", train=True), position=self._train_position)
        return self._train_loader

    def val_dataloader(self) -> ShardLoader:
        return self._loader(self._stream("val", train=False))

    def _train_position(self) -> tuple[int, Sequence[int] | None] | None:
        """Where each iteration of the train loader starts: a restored position once, then the trainer's epoch."""
        if self._resume is not None:
            position, self._resume = self._resume, None
            return position
        return (self.trainer.current_epoch, None) if self.trainer is not None else None

    def _fit_position(self) -> tuple[int, int, bool] | None:
        """(epoch, batches trained in it, whether that epoch is finished), from the fit loop; None outside fit."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        fit_loop = trainer.fit_loop
        # `started` is bumped at each epoch start, so started - 1 is the epoch the batch counter belongs to.
        epoch = max(0, fit_loop.epoch_progress.current.started - 1)
        batches = fit_loop.epoch_loop.batch_progress.current.processed
        # An epoch also ends early at limit_train_batches, which num_training_batches includes.
        return epoch, batches, batches >= min(self.steps_per_epoch(self.world_size), trainer.num_training_batches)

    def state_dict(self) -> dict:
        position = self._fit_position()
        if position is None:
            return {}
        epoch, batches, finished = position
        if finished:
            epoch, done = epoch + 1, []
        elif self._resume is not None and self._resume[0] == epoch:  # restored but not iterated yet
            done = list(self._resume[1])
        elif self._train_loader is not None:
            done = self._train_loader.progress_after(epoch, batches)
        else:
            done = self._loader(self._stream("train", True)).progress_after(epoch, batches)
        return {"format": _STATE_FORMAT, "epoch": epoch, "window_batches_done": done, **self._plan_identity()}

    def _plan_identity(self) -> dict:
        # What must match for the stored per-window progress to mean the same samples after a restart.
        return {
            "num_samples": self.num_train_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle_window": self.shuffle_window,
            "seed": self.seed,
            "order": ORDER_VERSION,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict or state_dict.get("format") != _STATE_FORMAT:
            return
        epoch, done = int(state_dict["epoch"]), [int(d) for d in state_dict["window_batches_done"]]
        now = self._plan_identity()
        changed = {k: (state_dict.get(k), v) for k, v in now.items() if state_dict.get(k) != v}
        if changed and any(done):
            rank_zero_warn(
                f"Resuming mid-epoch {epoch} with a different data plan {changed} (saved, now): the samples already "
                f"trained on in that epoch cannot be mapped to the new plan, so the epoch goes on with the new "
                f"plan's batches from where the trainer stands. Some samples of this one epoch may repeat or be missed."
            )
            batches = min(sum(done), self.steps_per_epoch(self.world_size))
            done = self._loader(self._stream("train", True)).progress_after(epoch, batches)
        self._resume = (epoch, done)


def build_eval_loader(
    root: str, eval_transform: Transform, batch_size: int, num_workers: int, *, max_bad_fraction: float,
    split: str = "val",
) -> ShardLoader:
    """A loader over every sample of `split`, in dataset order (for evaluation and export); it stops when more than
    `max_bad_fraction` of the samples fail to decode (the run's data.max_bad_fraction)."""
    info = read_info(root)
    stream = ShardStream(
        # In dataset order: nothing is shuffled, so the seed is unused; each worker reads windows of EVAL_WINDOW.
        info.shards(split), transform=eval_transform, batch_size=batch_size, train=False, seed=0,
        shuffle_window=EVAL_WINDOW, max_bad_fraction=max_bad_fraction, num_classes=info.num_classes, split=split,
    )
    prefetch = 2 if num_workers else None
    return ShardLoader(stream, num_workers=num_workers, pin_memory=torch.cuda.is_available(), prefetch_factor=prefetch)


class MixtureDataModule(ShardDataModule):
    """Training batches mixed from several sources (`mixture.MixtureStream`, made per rank by `make_stream`);
    validation as `ShardDataModule`'s, on `root`'s val split.

    An epoch is `epoch_samples` samples over all ranks (by default the labelled train split's size, so that epochs
    compare with a labels-only run at equal images seen). The position in checkpoints is (epoch, batches trained in
    it); every source's position follows from it."""

    def __init__(self, root: str, *, make_stream: Callable[[int, int, int], MixtureStream], epoch_samples: int | None,
                 **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.make_stream = make_stream
        self.epoch_samples = epoch_samples or self.num_train_samples
        self._mixture_resume: tuple[int, int] | None = None

    def steps_per_epoch(self, world_size: int) -> int:
        steps = self.epoch_samples // (world_size * self.batch_size)
        if steps == 0:
            raise DataError(f"kd.epoch_samples={self.epoch_samples} is fewer than world_size x batch_size = "
                            f"{world_size} x {self.batch_size}: no rank gets a batch")
        return steps

    def train_dataloader(self) -> MixtureLoader:
        stream = self.make_stream(self.rank, self.world_size, self.steps_per_epoch(self.world_size))
        self._train_loader = MixtureLoader(stream, num_workers=self.num_workers,
                                           pin_memory=self.pin_memory and self._on_accelerator(),
                                           persistent_workers=self.persistent_workers,
                                           prefetch_factor=self.prefetch_factor, position=self._mixture_position)
        return self._train_loader

    def _mixture_position(self) -> tuple[int, int] | None:
        if self._mixture_resume is not None:
            position, self._mixture_resume = self._mixture_resume, None
            return position
        return (self.trainer.current_epoch, 0) if self.trainer is not None else None

    def state_dict(self) -> dict:
        position = self._fit_position()
        if position is None:
            return {}
        epoch, batches, finished = position
        if finished:
            epoch, batches = epoch + 1, 0
        return {"format": _STATE_FORMAT, "mixture": True, "epoch": epoch, "batches": batches,
                "plan": self._mixture_identity()}

    def _mixture_identity(self) -> dict:
        return {"epoch_samples": self.epoch_samples, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "order": ORDER_VERSION}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict or not state_dict.get("mixture"):
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if state_dict.get("plan") != self._mixture_identity() and batches:
            rank_zero_warn(f"Resuming mid-epoch {epoch} with another kd stream plan ({state_dict.get('plan')} saved, "
                           f"{self._mixture_identity()} now): the epoch goes on from batch {batches} of the new plan.")
            batches = min(batches, self.steps_per_epoch(self.world_size))
        self._mixture_resume = (epoch, batches)
