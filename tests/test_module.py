"""train.module.ImageClassifier: what a training epoch logs (train metrics on logging steps, exact epoch accuracy)."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from train.module import ImageClassifier
from train.objective import ClassificationObjective, NoMixing
from train.optim import optimizer_factory, scheduler_factory

NUM_CLASSES, BATCH, BATCHES = 10, 8, 6
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _data(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (BATCH, 3, 8, 8), dtype=torch.uint8, generator=g),
             "target": torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)} for _ in range(BATCHES)]


def _fit(tmp_path, batches: list[dict], network: nn.Module) -> list[dict]:
    module = ImageClassifier(
        network, num_classes=NUM_CLASSES, mean=MEAN, std=STD, objective=ClassificationObjective(0.0),
        batch_mixing=NoMixing(), optimizer=optimizer_factory("sgd", lr=0.0, weight_decay=0.0),
        scheduler=scheduler_factory("cosine", 1), updates_per_epoch=lambda: BATCHES, channels_last=False,
    )
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, log_every_n_steps=2, limit_val_batches=0,
                      logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    with open(tmp_path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _accuracies(network: nn.Module, batch: dict) -> tuple[float, float]:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, torch.tensor(STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        logits = network((batch["image"].float() - mean) / std)
    top5 = logits.topk(5, dim=1).indices
    return ((top5[:, 0] == batch["target"]).float().sum().item(),
            (top5 == batch["target"][:, None]).any(1).float().sum().item())


def test_train_metrics_are_logged_on_logging_steps_and_the_epoch_accuracy_is_exact(tmp_path):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES))
    batches = _data()
    # lr 0: the weights stay fixed, so the accuracies can be recomputed here from the same network.
    hits = [_accuracies(network, b) for b in batches]
    rows = _fit(tmp_path, batches, network)
    steps = [r for r in rows if r.get("train/acc1")]
    assert len(steps) == BATCHES // 2 and all(r["train/loss"] for r in steps)
    batch_acc1 = {round(100 * h1 / BATCH, 4) for h1, _ in hits}
    assert {round(float(r["train/acc1"]), 4) for r in steps} <= batch_acc1
    epoch = next(r for r in rows if r.get("train/acc1_epoch"))
    assert float(epoch["train/acc1_epoch"]) == pytest.approx(100 * sum(h for h, _ in hits) / (BATCH * BATCHES))
    assert float(epoch["train/acc5_epoch"]) == pytest.approx(100 * sum(h for _, h in hits) / (BATCH * BATCHES))
