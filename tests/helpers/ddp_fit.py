"""A tiny Lightning fit/validate on shards that records what each rank saw (tests/test_ddp.py): run in-process for one
device, and by tests/scripts/ddp_run.py in processes of their own for several."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from shard_fixtures import PilDecode
from tiny_modules import KeyRecorder

from data_pipes.stream.datamodule import ShardDataModule


def build_trainer(devices: int, out: Path, datamodule: ShardDataModule) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",  # gloo on CPU
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*datamodule.callbacks(), ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
    )


def run(root: str, out: Path, devices: int, mode: str, ckpt: str | None = None, num_workers: int = 2) -> dict:
    """Fit and/or validate; returns this rank's record (also written to `out`)."""
    dm = ShardDataModule(root, batch_size=8, val_batch_size=4, num_workers=num_workers,
                         train_transform=PilDecode(16), eval_transform=PilDecode(16), seed=0, shuffle_window=16,
                         max_bad_fraction=0.01, prefetch_factor=2)
    module = KeyRecorder(dm.num_classes)
    trainer = build_trainer(devices, out, dm)
    if mode == "fit":
        trainer.fit(module, datamodule=dm)
        ckpt = str(out / "ckpt" / "last.ckpt")
    trainer.validate(module, datamodule=dm, ckpt_path=ckpt, weights_only=True, verbose=False)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps_per_epoch": dm.steps_per_epoch(trainer.world_size),
        "train_batches": module.train_batches,
        "train_keys": [k for _, _, keys in module.trained for k in keys],
        "val_keys": module.val_keys,
        "val_correct": module.val_correct,
        "val_images": float(trainer.callback_metrics["data/val_images"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}-{devices}-rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return record
