"""train.throughput.ThroughputLogger: images/s and FLOP/s per logging interval, validation left out."""

from __future__ import annotations

import csv
import time

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from train.callbacks import image_count
from train.tracking.throughput import ThroughputLogger

BATCH = 4


class _Tiny(LightningModule):
    def __init__(self, val_sleep: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.val_sleep = val_sleep
        self.flops_per_batch = 1e9

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch["image"].float().mean((2, 3))).sum()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int) -> DataLoader:
    images = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8)} for _ in range(n)]
    return DataLoader(images, batch_size=BATCH)


def _fit(tmp_path, module: _Tiny, **trainer_kw) -> list[dict]:
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[ThroughputLogger(image_count)],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **trainer_kw)
    trainer.fit(module, _loader(48), _loader(4) if trainer_kw.get("limit_val_batches") else None)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # Logged on Lightning's own logging steps, under the same step numbers as the module's metrics.
    assert [r["step"] for r in rows if r.get("perf/images_per_sec")] == [r["step"] for r in rows if r.get("train/loss")]
    return [row for row in rows if row.get("perf/images_per_sec")]


def test_throughput_is_logged_once_per_logging_step_with_flops(tmp_path):
    rows = _fit(tmp_path, _Tiny(), max_steps=6, log_every_n_steps=2, limit_val_batches=0)
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # after optimizer steps 2, 4, 6
    for r in rows:
        rate = float(r["perf/images_per_sec"])
        assert rate > 0 and rate == float(r["perf/images_per_sec_per_device"])  # one device
        assert float(r["perf/tflops_per_sec_per_device"]) > 0


def test_gradient_accumulation_logs_each_logging_step_once(tmp_path):
    rows = _fit(tmp_path, _Tiny(), max_steps=4, log_every_n_steps=2, accumulate_grad_batches=3, limit_val_batches=0)
    assert [int(r["step"]) for r in rows] == [1, 3]


def test_validation_time_is_not_counted_as_training_time(tmp_path):
    # Validation after every 2 batches sleeps 0.4 s. Counted in, the rate would be below 2*4/0.4 = 20 images/s.
    rows = _fit(tmp_path, _Tiny(val_sleep=0.4), max_steps=6, log_every_n_steps=2, val_check_interval=2,
                limit_val_batches=1)
    assert len(rows) == 3
    assert min(float(r["perf/images_per_sec"]) for r in rows) > 100
