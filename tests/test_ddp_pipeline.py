"""`python -m train` itself under 2-rank DDP (gloo on CPU), as a user launches it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_rank_validation_counts_every_image_once_and_equals_the_single_process_score(tmp_path, compiled):
    from data_pipes.shards.make import make_shards
    from data_pipes.shards.synthetic import make_image_folder

    # 45 validation images: odd, so one rank needs a padding sample that must not be counted.
    images = make_image_folder(tmp_path / "images", num_classes=9, train_per_class=12, val_per_class=5, size=48)
    synthetic_shards = tmp_path / "shards"
    make_shards(images, synthetic_shards, samples_per_shard=20, workers=1, progress=False)
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, "-m", "train", "experiment=demo", f"data.root={synthetic_shards}", f"hydra.run.dir={run_dir}",
         "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=2", "data.num_workers=1",
         "data.batch_size=16", "callbacks.progress_bar=false", f"compile={str(compiled).lower()}",
         "export_tflite=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/images")]
    last = rows[-1]
    num_val = json.loads((synthetic_shards / "_info.json").read_text())["splits"]["val"]["num_samples"]
    assert float(last["val/images"]) == num_val  # over both ranks, padding excluded
    # The export evaluates the same final weights in one process over the whole val split.
    exported = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert exported["val_images"] == num_val
    # compile=true: each rank's compiled network validated; the export is the plain one, evaluated eager.
    assert abs(float(last["val/acc1"]) - exported["top1"]) < 1e-3
    if compiled:
        assert "torch.compile (mode default): the first training step took" in result.stderr + result.stdout
        assert "more graph" not in result.stderr + result.stdout
