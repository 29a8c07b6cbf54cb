"""Shared fixtures: small data made on the spot, and the real-photo slice when ../shared is present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
    from data_pipes.shards.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("synthetic"), train_per_class=20, val_per_class=5, size=64)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, synthetic_folder) -> Path:
    """`synthetic_folder` written as shards (several per split) with `_info.json`."""
    from data_pipes.shards.make import make_shards

    out = tmp_path_factory.mktemp("synthetic-shards")
    make_shards(synthetic_folder, out, samples_per_shard=64, workers=1)
    return out
