"""Find the training data, or make the embedded demo dataset when the config asks for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipes.shards.make import make_shards
from data_pipes.shards.metadata import INFO_FILE, MAKE_SHARDS_HINT, DatasetError, DatasetInfo, read_info
from data_pipes.shards.synthetic import make_image_folder


def prepare_dataset(root: str | None, *, synthetic: dict[str, Any] | None = None) -> DatasetInfo:
    """Read (and validate) the shard directory at `root`; with `synthetic` settings, make it first if absent."""
    if not root:
        raise DatasetError(
            "data.root is not set. Pass data.root=DIR, a directory of WebDataset shards made by "
            f"`{MAKE_SHARDS_HINT}`, or try the pipeline on a generated dataset: python -m train experiment=demo"
        )
    root_path = Path(root).expanduser()
    if synthetic and not (root_path / INFO_FILE).is_file():
        make_synthetic_shards(root_path, **synthetic)
    return read_info(root_path)


def make_synthetic_shards(root: Path, *, num_classes: int, train_per_class: int, val_per_class: int, size: int,
                          seed: int = 0) -> None:
    images = make_image_folder(root.with_name(root.name + "-images"), num_classes=num_classes,
                               train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed)
    make_shards(images, root, samples_per_shard=max(64, train_per_class * num_classes // 4), workers=1)
