"""Shared fixtures: small data made on the spot, the real-photo slice when ../shared is present, and runs composed
as `python -m train` composes them, with the overrides every CPU test run shares (`CPU_RUN`)."""

from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist (`make test`) the workers share the cores: each takes its share of torch's intra-op threads
# (oversubscribed thread pools spin against each other), and the DDP ranks and loader workers it starts inherit it.
# Set before torch is imported below: OpenMP reads it when it loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

import pytest  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from data_pipes.shards.make import make_shards  # noqa: E402
from data_pipes.shards.synthetic import make_image_folder  # noqa: E402
from train.nets.configs import compose_config  # noqa: E402
from train.quant.backend import onnxruntime_int8_overflows  # noqa: E402
from train.run import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# What every test run on this machine needs: the CPU, one process, no progress bar in the logs, no W&B unless a test
# asks for it, a small, fast model at 32 px, and no LiteRT conversion (about 20 s of an export) unless a test of
# LiteRT files asks for it (test_litert, test_qat_run). A test adds or overrides any of these.
CPU_RUN = ("trainer.accelerator=cpu", "trainer.devices=1", "callbacks.progress_bar=false",
           "logger.wandb.enabled=false", "model=mnv3_s_075", "data.img_size=32", "data.num_workers=1",
           "export_tflite=false")
SHARED_DATA = REPO.parent / "shared" / "data"
IMAGENETTE = SHARED_DATA / "imagenette2-224"


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """Real ImageNet photos (10 classes). Absent in a user's fresh clone; always present in CI."""
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"needs the shared imagenette slice at {IMAGENETTE} (present in CI, absent in a fresh clone)")
    return IMAGENETTE


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    """A small learnable ImageNet-layout folder: 10 classes, 20 train / 5 val images each, 64x64 JPEGs."""
    return make_image_folder(tmp_path_factory.mktemp("synthetic"), train_per_class=20, val_per_class=5, size=64)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, synthetic_folder) -> Path:
    """`synthetic_folder` written as shards (several per split) with `_info.json`."""
    out = tmp_path_factory.mktemp("synthetic-shards")
    make_shards(synthetic_folder, out, samples_per_shard=64, workers=1)
    return out


def compose_run(*overrides: str) -> DictConfig:
    """A run's config for this machine: conf/train.yaml with CPU_RUN, then `overrides` (which win), composed as
    `python -m train` composes it. Test modules import it (`from conftest import compose_run`)."""
    return compose_config([*CPU_RUN, *overrides])


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, synthetic_shards) -> Path:
    """A teacher trained by the pipeline itself on `synthetic_shards` (one short epoch: for tests of mechanics and
    cost, not accuracy); its export directory."""
    run_dir = tmp_path_factory.mktemp("teacher")
    train(compose_run("data.num_workers=2", f"run_dir={run_dir}", f"data.root={synthetic_shards}",
                      "data.batch_size=25", "trainer.max_epochs=1"))
    return run_dir / "export"


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """Synthetic shapes as shards, enough of them (60 a class, 5 val) for a small model to learn them well in a
    minute: the data of the QAT tests."""
    tmp = tmp_path_factory.mktemp("shapes")
    images = make_image_folder(tmp / "images", train_per_class=60, val_per_class=5, size=64)
    make_shards(images, tmp / "shards", samples_per_shard=200, workers=1, progress=False)
    return tmp / "shards"


@pytest.fixture(scope="session")
def weight_bits() -> int:
    """The weight bits of the QAT tests that check onnxruntime against the PyTorch int8 model: 7 on x86 CPUs without
    VNNI, where onnxruntime's int8 kernels overflow with full-range weights (train/quant/backend.py), else 8.
    MOBILENET_TEST_WEIGHT_BITS=7 runs the 7-bit path on any host."""
    return int(os.environ.get("MOBILENET_TEST_WEIGHT_BITS") or (7 if onnxruntime_int8_overflows() else 8))
