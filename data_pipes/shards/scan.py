"""Find the images of an ImageNet-layout folder, their labels and their sample keys (make_shards, step 1).

Layouts: `SRC/<split>/<class>/**/<image>` (ImageFolder), and for validation also ImageNet's flat
`SRC/val/<image>` with a label file (see `shard_labels`). Class index = position of the class folder name in the
sorted train class folders, as torchvision's ImageFolder assigns it.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from data_pipes.shards.val_labels import LABEL_HELP, ShardSourceError, find_val_labels, image_id, read_val_labels

SPLITS = ("train", "val")
# torchvision's ImageFolder extensions; other files are reported, never packed.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# USTAR tar member names hold 100 characters; long stems are shortened with a hash so keys stay unique.
MAX_KEY_CHARS = 80
_LIST_THREADS = 32  # stat() calls wait on the disk (or NFS), not the CPU


@dataclass(frozen=True, slots=True)  # slots: ImageNet lists 1.28M of these
class Entry:
    """One source image: path relative to SRC, class index, sample key, size in bytes."""

    rel: str
    label: int
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class Skip:
    """A source file left out, and why."""

    reason: str
    path: str
    detail: str = ""


@dataclass
class SplitSource:
    name: str
    entries: list[Entry]
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Source:
    root: Path
    label_names: list[str]
    splits: dict[str, SplitSource]
    notes: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class folder names; hidden folders (.ipynb_checkpoints, .Trash) are not classes."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def has_flat_images(split_dir: Path) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in os.scandir(split_dir))


def list_class_folder(root: Path, rel_dir: str) -> tuple[list[tuple[str, int]], list[Skip]]:
    """(relative path, size) of every image under root/rel_dir, recursively and sorted; other files as skips."""
    files, skips = [], []
    for dirpath, dirnames, filenames in os.walk(root / rel_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            _add_file(root, rel, files, skips)
    return files, skips


def list_flat_folder(root: Path, rel_dir: str) -> tuple[list[tuple[str, int]], list[Skip]]:
    files, skips = [], []
    for name in sorted(e.name for e in os.scandir(root / rel_dir) if not e.is_dir()):
        _add_file(root, f"{rel_dir}/{name}", files, skips)
    return files, skips


def _add_file(root: Path, rel: str, files: list, skips: list) -> None:
    path = root / rel
    if not is_image_name(rel):
        skips.append(Skip("not-an-image-extension", str(path), f"extension not in {' '.join(IMG_EXTENSIONS)}"))
        return
    try:
        size = os.stat(path).st_size
    except OSError as e:  # dangling symlink, permission, I/O error
        skips.append(Skip("unreadable", str(path), f"{type(e).__name__}: {e.strerror or e}"))
        return
    if size == 0:
        skips.append(Skip("empty", str(path), "0 bytes"))
        return
    files.append((rel, size))


def list_many(root: Path, rel_dirs: list[str]) -> list[tuple[list[tuple[str, int]], list[Skip]]]:
    """list_class_folder over many folders at once: ImageNet has 1000 of them, on disks that like parallel I/O."""
    with ThreadPoolExecutor(min(_LIST_THREADS, max(1, len(rel_dirs)))) as pool:
        return list(pool.map(lambda d: list_class_folder(root, d), rel_dirs))


def sanitize_key(stem: str) -> str:
    """A webdataset key: no dots (they separate key from field), no slashes or odd characters, bounded length."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"
    if len(key) > MAX_KEY_CHARS:
        key = f"{key[:MAX_KEY_CHARS - 9]}_{hashlib.sha1(stem.encode()).hexdigest()[:8]}"
    return key


def assign_keys(items: list[tuple[str, str]]) -> list[str]:
    """Unique key per (relative path, class name), from the file stem; stems shared by several files get the
    class name in front (and a counter if that still collides). Deterministic for a given sorted input."""
    stems = [sanitize_key(_stem(rel)) for rel, _ in items]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    used: set[str] = set()
    keys = []
    for (_, cls), stem in zip(items, stems):
        base = stem if counts[stem] == 1 else sanitize_key(f"{cls}_{stem}")
        key, n = base, 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        keys.append(key)
    return keys


def _stem(rel: str) -> str:
    """File name without its extension; inner dots are kept here and sanitised into the key."""
    name = rel.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def scan_source(src: Path, val_labels: Path | None = None, devkit_meta: Path | None = None) -> Source:
    """Every split under SRC with its images, labels, keys and sizes, plus what was left out and why."""
    src = Path(src).expanduser().resolve()
    present = _present_splits(src)
    label_names = _label_names(src, present)
    source = Source(src, label_names, {})
    for split in present:
        if class_folders(src / split):
            source.splits[split] = _scan_class_split(src, split, label_names)
        elif has_flat_images(src / split):
            source.splits[split] = _scan_flat_split(src, split, label_names, val_labels, devkit_meta, source.notes)
        else:
            source.notes.append(f"{split}: {src / split} has no images, so there is no '{split}' split")
    if not source.splits:
        raise ShardSourceError(f"--src {src} has no images under {' or '.join(present)}/")
    if val_labels and not any("labels from" in note for note in source.notes):
        source.notes.append(f"--val-labels {val_labels} not used: no split is a flat folder (val/ has class folders)")
    return source


def _present_splits(src: Path) -> list[str]:
    if not src.is_dir():
        raise ShardSourceError(f"--src {src} is not a directory; point it at an ImageNet-layout folder holding "
                               f"train/<class>/*.JPEG and val/<class>/*.JPEG")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if not present:
        hint = " It holds class-like folders: put them under SRC/train/." if class_folders(src) else ""
        raise ShardSourceError(f"--src {src} has neither train/ nor val/; expected ImageNet layout "
                               f"SRC/train/<class>/<image> and SRC/val/<class>/<image>.{hint}")
    return present


def _label_names(src: Path, present: list[str]) -> list[str]:
    """Class names in index order: the sorted train class folders (val's only when there is no train split)."""
    split = "train" if "train" in present else present[0]
    names = class_folders(src / split)
    if not names:
        raise ShardSourceError(
            f"{src / split} has no class folders, so the class list is unknown. Classes are the folder names of "
            f"SRC/train/<class>/; a flat val/ folder is labelled against them (a train/ split is needed)."
        )
    return names


def _scan_class_split(src: Path, split: str, label_names: list[str]) -> SplitSource:
    classes = class_folders(src / split)
    unknown = sorted(set(classes) - set(label_names))
    if unknown:
        raise ShardSourceError(f"{src / split} has {len(unknown)} class folder(s) that train/ lacks (first: "
                               f"{unknown[0]}); val classes must be train classes. Remove them or add them to train/.")
    if has_flat_images(src / split):
        raise ShardSourceError(f"{src / split} mixes class folders with loose images; move the loose images "
                               f"into their class folders (or remove the class folders for a flat val layout).")
    listed = list_many(src, [f"{split}/{c}" for c in classes])
    index = {name: i for i, name in enumerate(label_names)}
    items, sizes, skipped = [], [], []
    for cls, (files, skips) in zip(classes, listed):
        if not files and split == "train":
            raise ShardSourceError(f"class folder {src / split / cls} has no readable images ({len(skips)} other "
                                   f"files); every train folder is a class, so remove it or add its images.")
        items += [(rel, cls) for rel, _ in files]
        sizes += [size for _, size in files]
        skipped += skips
    keys = assign_keys(items)
    entries = [Entry(rel, index[cls], key, size) for (rel, cls), key, size in zip(items, keys, sizes)]
    return SplitSource(split, entries, skipped)


def _scan_flat_split(src: Path, split: str, label_names: list[str], val_labels: Path | None,
                     devkit_meta: Path | None, notes: list[str]) -> SplitSource:
    path = Path(val_labels) if val_labels else find_val_labels(src)
    if path is None:
        raise ShardSourceError(f"{src / split} holds images without class folders (ImageNet's flat val layout), "
                               f"and no label file was found in or next to --src; {LABEL_HELP}")
    wnid_of = read_val_labels(path, devkit_meta)
    notes.append(f"{split}: labels from {path}")
    files, skipped = list_flat_folder(src, split)
    index = {name: i for i, name in enumerate(label_names)}
    items, sizes, labels = [], [], []
    for rel, size in files:
        wnid = wnid_of.get(image_id(rel))
        if wnid is None:
            skipped.append(Skip("no-label", str(src / rel), f"not in {path.name}"))
        elif wnid not in index:
            skipped.append(Skip("class-not-in-train", str(src / rel), f"{wnid} is not a train class folder"))
        else:
            items.append((rel, wnid))
            sizes.append(size)
            labels.append(index[wnid])
    if files and not items:
        raise ShardSourceError(f"none of the {len(files)} images in {src / split} got a label from {path} (by "
                               f"name and by train class); is it the label file of this dataset?")
    keys = assign_keys(items)
    entries = [Entry(rel, label, key, size) for (rel, _), key, size, label in zip(items, keys, sizes, labels)]
    return SplitSource(split, entries, skipped)
