"""A real 2-process DDP run (gloo, CPU) on deliberately uneven shards, launched as a user would launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ddp_fit
import pytest
from shard_fixtures import sample_key, write_shards

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,  # two processes of a real DDP run
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # the in-process validation's own dir
]

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"
TRAIN = (37, 5, 30, 1, 23, 3)  # 99 samples: 49 per rank, 6 batches of 8, some shards smaller than a batch
VAL = (13, 2, 10)  # 25 samples: 13 positions per rank, the second rank padded by one
TIMEOUT_S = 240  # a rank waiting on a collective that never comes would hang here, not pass


def launch(root: Path, out: Path, devices: int, mode: str) -> list[dict]:
    cmd = [sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), "--devices", str(devices),
           "--mode", mode]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"{mode}-{devices}-rank{r}.json").read_text()) for r in range(devices)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    root = write_shards(tmp / "shards", TRAIN, VAL, num_classes=4)
    two = launch(root, tmp / "out", devices=2, mode="fit")
    # One rank needs no launcher: validate the same checkpoint in this process.
    one = ddp_fit.run(str(root), tmp / "one", devices=1, mode="validate", ckpt=str(tmp / "out" / "ckpt" / "last.ckpt"))
    return two, [one]


def test_every_rank_trains_the_same_number_of_batches_on_disjoint_samples(runs):
    two, _ = runs
    assert [r["train_batches"] for r in two] == [6, 6] == [r["steps_per_epoch"] for r in two]
    keys = two[0]["train_keys"] + two[1]["train_keys"]
    assert len(keys) == len(set(keys)) == 2 * 6 * 8


def test_validation_over_two_ranks_counts_every_image_exactly_once(runs):
    two, _ = runs
    keys = two[0]["val_keys"] + two[1]["val_keys"]
    assert sorted(keys) == sorted(sample_key("val", s, i) for s, n in enumerate(VAL) for i in range(n))
    assert [len(r["val_keys"]) for r in two] == [13, 12]
    assert [r["val_images"] for r in two] == [25.0, 25.0]  # DataHealthMonitor's count, summed over ranks


def test_top1_over_two_ranks_equals_top1_on_one_rank_with_the_same_weights(runs):
    two, one = runs
    assert sorted(one[0]["val_keys"]) == sorted(two[0]["val_keys"] + two[1]["val_keys"])
    assert two[0]["val_correct"] + two[1]["val_correct"] == one[0]["val_correct"]
