"""The shard directory's metadata file, `_info.json`.

One file serves us and timm: timm's WebDataset reader (`timm.data.readers.reader_wds`) reads `splits.<name>`
with `name`, `num_samples`, `filenames` and `shard_lengths`; we add `label_names` (class folder names in index
order) so that training needs no `num_classes` override.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_pipes.errors import UserError

INFO_FILE = "_info.json"
FORMAT = "mobilenet-train/wds-v1"
MAKE_SHARDS_HINT = "python -m data_pipes.shards.make --src /data/imagenet --out /data/imagenet-wds"


class DatasetError(UserError, ValueError):
    """The shard directory is missing, empty, or disagrees with its metadata."""


@dataclass(frozen=True)
class SplitInfo:
    name: str
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    # (reason, count) pairs for source files make_shards left out; a tuple keeps the dataclass hashable.
    skipped: tuple[tuple[str, int], ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    @property
    def num_skipped(self) -> int:
        return sum(n for _, n in self.skipped)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "filenames": list(self.filenames),
            "shard_lengths": list(self.shard_lengths),
            # Extra keys are ignored by timm's reader, which reads only the four above.
            "num_skipped": self.num_skipped,
            "skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    label_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(
                f"{self.root / INFO_FILE} has no '{name}' split (it has: {', '.join(sorted(self.splits)) or 'none'}). "
                f"Re-make the shards with both train/ and val/ folders: {MAKE_SHARDS_HINT}"
            )
        return self.splits[name]

    def shards(self, split: str) -> list[tuple[Path, int]]:
        """(path, sample count) of every shard of a split, in metadata order."""
        info = self.split(split)
        return [(self.root / f, n) for f, n in zip(info.filenames, info.shard_lengths)]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "label_names": list(self.label_names),
            "num_classes": self.num_classes,
            "splits": {k: v.to_json() for k, v in self.splits.items()},
        }


def write_info(info: DatasetInfo) -> Path:
    """Write `_info.json` atomically (a reader never sees half a file)."""
    path = Path(info.root) / INFO_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def info_sha256(root: str | os.PathLike) -> str:
    """The shard set's identity: the first 16 hex digits of the SHA-256 of its `_info.json` (which lists every
    shard and its sample count)."""
    return hashlib.sha256((Path(root) / INFO_FILE).read_bytes()).hexdigest()[:16]


def read_info(root: str | os.PathLike, *, check_files: bool = True, setting: str = "data.root") -> DatasetInfo:
    """Read and validate a shard directory; every problem is reported with what was expected and how to fix it
    (`setting`: the config key that named the directory, for the messages)."""
    root = Path(os.path.abspath(Path(root).expanduser()))  # recorded in checkpoints: valid from any working directory
    if root.is_file():
        raise DatasetError(f"{setting}={root} is a file: point it at the directory of shards (train-*.tar, val-*.tar, "
                           f"{INFO_FILE}){'; the directory holding this one' if root.suffix == '.tar' else ''}")
    if not root.is_dir():
        raise DatasetError(
            f"{setting}={root} does not exist. Point {setting} at a directory of WebDataset shards "
            f"(train-*.tar, val-*.tar, {INFO_FILE}); make one from an ImageNet-style folder with: {MAKE_SHARDS_HINT}"
        )
    path = root / INFO_FILE
    if not path.is_file() and _is_image_folder(root):
        raise DatasetError(
            f"{setting}={root} is a folder of images, not shards: make shards from it once with `python -m "
            f"data_pipes.shards.make --src {root} --out {root.parent / (root.name + '-wds')}`, then train with "
            f"{setting}={root.parent / (root.name + '-wds')}"
        )
    if not path.is_file():
        tars = sorted(p.name for p in root.glob("*.tar"))
        found = f"it holds {len(tars)} .tar files but no {INFO_FILE}" if tars else "it is empty of shards"
        raise DatasetError(
            f"{setting}={root} is not a shard directory: {found}. Shards and their metadata are written together "
            f"by: {MAKE_SHARDS_HINT}"
        )
    try:
        raw = json.loads(path.read_text())
        splits = {
            name: SplitInfo(
                name,
                tuple(s["filenames"]),
                tuple(int(n) for n in s["shard_lengths"]),
                tuple((str(k), int(n)) for k, n in s.get("skipped", {}).items()),
            )
            for name, s in raw["splits"].items()
        }
        labels = tuple(raw["label_names"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path} is not valid shard metadata ({e!r}); re-make it with: {MAKE_SHARDS_HINT}") from e
    info = DatasetInfo(root=root, label_names=labels, splits=splits, name=raw.get("name", ""))
    if check_files:
        _check_files(info)
    return info


def _check_files(info: DatasetInfo) -> None:
    for split in info.splits.values():
        if len(split.filenames) != len(split.shard_lengths):
            raise DatasetError(f"{info.root / INFO_FILE}: split '{split.name}' lists {len(split.filenames)} shards "
                               f"but {len(split.shard_lengths)} shard lengths; re-make it with: {MAKE_SHARDS_HINT}")
        missing = [f for f in split.filenames if not (info.root / f).is_file()]
        if missing:
            raise DatasetError(
                f"{info.root / INFO_FILE} lists {len(missing)} shard(s) of split '{split.name}' that are not on disk "
                f"(first: {missing[0]}). Copy the missing shards, or re-make the directory with: {MAKE_SHARDS_HINT}"
            )
        listed = set(split.filenames)
        extra = sorted(p.name for p in info.root.glob(f"{split.name}-*.tar") if p.name not in listed)
        if extra:
            raise DatasetError(
                f"{info.root} holds {len(extra)} '{split.name}' shard(s) that {INFO_FILE} does not list "
                f"(first: {extra[0]}): the metadata does not match the tar files. Re-run make_shards on the same "
                f"--out to finish an interrupted write, or remove the stray files."
            )


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _is_image_folder(root: Path, look: int = 200) -> bool:
    """Whether `root` looks like an ImageNet-layout folder (train/<class>/<image>) or a folder of images: a bounded
    look at the first entries, never a walk of the whole tree."""
    for top in (root / "train", root):
        if not top.is_dir():
            continue
        for i, entry in enumerate(top.iterdir()):
            if i >= look:
                break
            if entry.is_file() and entry.suffix.lower() in _IMAGE_SUFFIXES:
                return True
            if entry.is_dir():
                inner = next((p for _, p in zip(range(look), entry.iterdir())
                              if p.suffix.lower() in _IMAGE_SUFFIXES), None)
                if inner is not None:
                    return True
    return False
