"""A tiny Lightning run on shards that dumps what each rank saw, for tests/test_ddp.py.

    python tests/scripts/ddp_run.py --root SHARDS --out DIR --devices 2 --mode fit
    python tests/scripts/ddp_run.py --root SHARDS --out DIR --devices 1 --mode validate --ckpt DIR/ckpt/last.ckpt

`fit` trains one epoch (DDP over gloo when --devices > 1), then validates the last checkpoint with the same
processes; `validate` only validates a checkpoint. Each rank writes DIR/<mode>-<devices>-rank<r>.json. Lightning's
DDP launcher re-executes this script once per extra rank, as it would for a user's training script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # tiny_modules; the repo, when not pip-installed

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from shard_fixtures import PilDecode  # noqa: E402
from tiny_modules import KeyRecorder  # noqa: E402

from data_pipes.stream.datamodule import ShardDataModule  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--mode", choices=("fit", "validate"), default="fit")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--num-workers", type=int, default=2)
    return p.parse_args()


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


def main() -> None:
    args = parse_args()
    run(args.root, args.out, args.devices, args.mode, args.ckpt, args.num_workers)


if __name__ == "__main__":
    main()
