"""Every rank's RNG states in each checkpoint, put back where the interrupted run was: an exact resume."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.seed import seed_everything

log = logging.getLogger(__name__)


class RngStates(Callback):
    """Every rank's global RNG states (torch, CUDA, numpy, Python) in each checkpoint, put back at the first training
    batch after a resume: dropout, drop-path and Mixup/CutMix then draw what the uninterrupted run drew.

    Put back at the first batch rather than at load, because in between the resumed run builds its loaders and
    runs the sanity check, which the run it continues did not do at that point. (Loaders draw their workers' base
    seed from their own generator, not from the global one: see `ShardLoader`. Augmentation is reseeded per batch
    in the workers.) States are plain tensors and numbers, so checkpoints still load with `weights_only=True`."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook for every save (Lightning writes the file on rank 0), so the gather is safe.
        mine = _rng_states()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        if len(states) != trainer.world_size:
            if trainer.is_global_zero:
                log.warning("resume: the checkpoint holds the RNG states of %d ranks, this run has %d: random draws "
                            "(dropout, drop-path, mixup) will not repeat the interrupted run's", len(states),
                            trainer.world_size)
            return
        self._pending = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class RankSeeds(Callback):
    """Seeds every rank's global RNGs with `seed + rank` when training starts, so that dropout, drop-path and
    Mixup/CutMix draw different masks and mixing on each rank (with one seed everywhere, every rank of a step drew
    the same ones). timm seeds `seed + rank` too. The network is built before this, from the one seed, so every rank
    starts from the same weights (and the same EMA copy). A resumed run then puts each rank's saved states back at
    its first batch (`RngStates`). One process: nothing changes."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


def _rng_states() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    # CUDA: the state of this process's own device only (a rank drives one device; a resume may see fewer of them).
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if cuda else [],
            "cuda_device": torch.cuda.current_device() if cuda else -1,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": [version, list(py_state), gauss]}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    cuda = _own_cuda_state(states)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu())  # the current device: the one this rank drives
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, py_state, gauss = states["python"]
    random.setstate((version, tuple(py_state), gauss))


def _own_cuda_state(states: dict[str, Any]) -> torch.Tensor | None:
    """This rank's CUDA generator state: the one saved (`cuda_device` set), or, in checkpoints that saved every
    visible device's, the entry of the device this process drives now (none when it is out of their range)."""
    saved = states.get("cuda") or []
    if not saved:
        return None
    if "cuda_device" in states:
        return saved[0]
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return saved[index] if index < len(saved) else None
