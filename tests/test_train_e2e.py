"""End to end on real photos: shards -> train -> export -> the export reloads through timm and onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import compose_run
from safetensors.torch import load_file

from data_pipes.shards.make import make_shards
from train.run import train

REPO = Path(__file__).resolve().parents[1]
# Four visually distinct Imagenette classes: chance is 25%.
CLASSES = ("n01440764", "n03028079", "n03445777", "n03888257")  # tench, church, golf ball, parachute


def imagenette_slice(root: Path, out: Path, *, train_per_class: int, val_per_class: int) -> Path:
    """Symlink a few real photos per class into ImageNet layout (the photos themselves stay in ../shared)."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid in CLASSES:
            folder = out / split / wnid
            folder.mkdir(parents=True)
            for src in sorted((root / split / wnid).iterdir())[:count]:
                (folder / src.name).symlink_to(src)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, imagenette_root):
    tmp = tmp_path_factory.mktemp("e2e")
    images = imagenette_slice(imagenette_root, tmp / "images", train_per_class=160, val_per_class=40)
    shards = tmp / "shards"
    make_shards(images, shards, samples_per_shard=100, workers=2)
    cfg = compose_run(
        f"run_dir={tmp / 'run'}", f"data.root={shards}", "model=mnv3_s_100", "data.img_size=96",
        "data.batch_size=32", "data.num_workers=2", "trainer.max_epochs=14", "optim.lr=3e-3",
        "optim.weight_decay=0.01", "sched.warmup_epochs=1", "label_smoothing=0.0", "aug.train.scale=[0.35,1]",
        "model.drop_rate=0.0", "ema.decay=0.98", "logger.wandb.enabled=true", "logger.wandb.mode=offline",
    )
    metrics = train(cfg)
    return tmp / "run", metrics


@pytest.mark.imagenette
@pytest.mark.slow
def test_short_run_on_real_photos_learns_well_above_chance(trained_run):
    run_dir, metrics = trained_run
    exported = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert exported["val_images"] == 4 * 40
    assert exported["top1"] > 45.0, exported  # chance is 25%
    assert metrics["val/images"] == 160


@pytest.mark.imagenette
@pytest.mark.slow
def test_export_reloads_through_timm_and_onnxruntime_with_matching_logits(trained_run):
    import train.nets  # noqa: F401  (registers the MobileNet variants timm lacks)

    export = trained_run[0] / "export"
    config = json.loads((export / "config.json").read_text())
    n = config["num_classes"]
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=n,
                              pretrained_cfg_overlay=dict(file=str(export / "model.safetensors"), num_classes=n))
    model.eval()
    weights = load_file(export / "model.safetensors")
    assert torch.equal(model.state_dict()["classifier.weight"], weights["classifier.weight"])

    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
    assert config["label_names"] == list(CLASSES)


@pytest.mark.imagenette
@pytest.mark.slow
def test_run_directory_holds_checkpoints_logs_and_export(trained_run):
    run_dir = trained_run[0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert list((run_dir / "csv").glob("**/metrics.csv"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["run_config"]["model"]["name"] == "mobilenetv3_small_100"
    assert ckpt["dataset"]["label_names"] == list(CLASSES)
