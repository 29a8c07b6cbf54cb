"""`DataHealthMonitor`: logs the bad samples the loaders replaced, and stops the run when there are too many.

Each batch carries `bad` (samples replaced in it) and `bad_keys` ("shard:key: reason" of each). The counts are
summed over all ranks with a collective on every rank at the same batch, so every rank raises together (an
exception on one DDP rank alone would leave the others waiting in the next all-reduce).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from data_pipes.shards.metadata import MAKE_SHARDS_HINT
from data_pipes.stream.loader import DataError

_MAX_REPORTED = 20


class _Tally:
    def __init__(self) -> None:
        self.bad, self.samples, self.valid, self.batches, self.names = 0, 0, 0, 0, []

    def add(self, batch: dict) -> None:
        # Counts stay on the batch's device: reading them every step would stall the GPU queue.
        self.bad = self.bad + batch["bad"]
        self.valid = self.valid + batch["valid"].sum()
        self.samples += len(batch["valid"])
        self.batches += 1
        self.names.extend(batch.get("bad_keys", [])[: _MAX_REPORTED - len(self.names)])

    def reduced(self, trainer: pl.Trainer) -> tuple[int, int, int]:
        """(bad, samples, valid) summed over all ranks; a collective: call it on every rank at the same point."""
        device = trainer.strategy.root_device
        local = torch.stack([torch.as_tensor(v, device=device).to(torch.float64)
                             for v in (self.bad, self.samples, self.valid)])
        total = trainer.strategy.reduce(local, reduce_op="sum")
        return tuple(int(v) for v in total.cpu().tolist())


class DataHealthMonitor(Callback):
    """Logs `data/bad_samples`, `data/bad_fraction` per training epoch and `data/val_bad_samples`,
    `data/val_images` (images actually evaluated, over all ranks) per validation, and raises `DataError` once
    the bad samples exceed `max_bad_fraction` (default: the datamodule's): of the whole epoch's samples, checked
    every `check_every_n_batches`; of the samples seen, at the end of each epoch."""

    def __init__(self, max_bad_fraction: float | None = None, check_every_n_batches: int = 100) -> None:
        self.max_bad_fraction, self.check_every = max_bad_fraction, check_every_n_batches
        self._train, self._val, self._epoch = _Tally(), _Tally(), None

    def _limit(self, trainer: pl.Trainer) -> float:
        if self.max_bad_fraction is not None:
            return self.max_bad_fraction
        return float(getattr(trainer.datamodule, "max_bad_fraction", 0.01))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != self._epoch:  # on_train_epoch_start is skipped on a mid-epoch restart
            self._train, self._epoch = _Tally(), trainer.current_epoch
        self._train.add(batch)
        if self._train.batches % self.check_every == 0:
            bad, samples, _ = self._train.reduced(trainer)
            per_batch = samples / max(1, self._train.batches * trainer.world_size)
            epoch_samples = per_batch * trainer.num_training_batches * trainer.world_size
            self._check(trainer, "train", bad, epoch_samples)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bad, samples, _ = self._train.reduced(trainer)
        pl_module.log("data/bad_samples", float(bad), on_epoch=True, sync_dist=False)
        pl_module.log("data/bad_fraction", bad / max(1, samples), on_epoch=True, sync_dist=False)
        self._check(trainer, "train", bad, samples)
        self._train = _Tally()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val = _Tally()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._val.add(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        bad, _, valid = self._val.reduced(trainer)
        pl_module.log("data/val_bad_samples", float(bad), sync_dist=False)
        pl_module.log("data/val_images", float(valid), sync_dist=False)
        self._check(trainer, "val", bad, valid + bad)

    def _check(self, trainer: pl.Trainer, split: str, bad: int, samples: float) -> None:
        limit = self._limit(trainer)
        if bad > limit * samples:
            tally = self._train if split == "train" else self._val
            raise DataError(
                f"{bad} of {samples:.0f} '{split}' samples could not be read ({bad / max(1, samples):.2%}), more "
                f"than data.max_bad_fraction={limit}. Bad samples seen by rank {trainer.global_rank} (shard:key: "
                f"reason): {tally.names}. Fix or re-make those shards ({MAKE_SHARDS_HINT}), or raise "
                f"data.max_bad_fraction to skip them."
            )
