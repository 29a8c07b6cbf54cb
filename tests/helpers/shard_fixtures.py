"""Tiny shard directories and a tiny decoder, for tests and smoke runs of the stream (no ImageNet needed).

`write_shards` writes `train-NNNNNN.tar` / `val-NNNNNN.tar` of the given (deliberately uneven) sizes plus
`_info.json`, with each image a flat colour that depends on its class (a linear model on pooled pixels learns
it), and can plant every kind of bad sample the stream must survive.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data_pipes.shards.metadata import DatasetInfo, SplitInfo, write_info

# Each planted kind of bad `jpg` payload, by name.
BAD_PAYLOADS = ("corrupt_jpeg", "truncated_jpeg", "empty", "not_image")


class PilDecode:
    """bytes -> uint8 HWC RGB of `size` x `size` (PIL decode + resize); raises on anything PIL cannot decode."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def __call__(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB").resize((self.size, self.size)), dtype=np.uint8)


def class_colour(label: int) -> tuple[int, int, int]:
    return ((label * 97) % 256, (label * 53 + 80) % 256, (255 - label * 71) % 256)


def jpeg_bytes(label: int, size: int = 16, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(class_colour(label)) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bad_payload(kind: str, label: int, size: int = 16) -> bytes:
    good = jpeg_bytes(label, size)
    payloads = {
        "corrupt_jpeg": good[:20] + bytes(range(256)) * 2,  # a JPEG header, then garbage
        "truncated_jpeg": good[: len(good) // 2],
        "empty": b"",
        "not_image": b"this is a text file, not an image\n",
    }
    return payloads[kind]


def sample_key(split: str, shard: int, index: int) -> str:
    return f"{split}_{shard:03d}_{index:04d}"


def sample_label(shard: int, index: int, num_classes: int) -> int:
    return (shard * 7 + index) % num_classes


def write_split(
    root: Path, split: str, lengths: Sequence[int], num_classes: int, size: int, bad: dict[str, str]
) -> SplitInfo:
    """Shards of `lengths` samples; `bad` maps a sample key to a `BAD_PAYLOADS` kind to plant there."""
    names = []
    for s, length in enumerate(lengths):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(length):
                key, label = sample_key(split, s, i), sample_label(s, i, num_classes)
                jpg = bad_payload(bad[key], label, size) if key in bad else jpeg_bytes(label, size, seed=s * 1000 + i)
                sink.write({"__key__": key, "jpg": jpg, "cls": str(label).encode()})
        names.append(name)
    return SplitInfo(split, tuple(names), tuple(lengths))


def write_shards(
    root: str | Path,
    train: Sequence[int],
    val: Sequence[int],
    *,
    num_classes: int = 4,
    size: int = 16,
    bad: dict[str, str] | None = None,
) -> Path:
    """A complete shard directory at `root` (created); returns it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    splits = {split: write_split(root, split, lengths, num_classes, size, bad)
              for split, lengths in (("train", train), ("val", val))}
    write_info(DatasetInfo(root=root, label_names=tuple(f"class{c}" for c in range(num_classes)), splits=splits))
    return root


def truncate_tar(path: str | Path, keep_samples: int) -> int:
    """Cut a shard in the middle of sample `keep_samples`'s image data (as an interrupted copy would).
    Returns how many samples are lost: that one and all after it."""
    import tarfile

    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    victim = next(m for m in members if m.name.startswith(keys[keep_samples] + ".") and m.name.endswith(".jpg"))
    with open(path, "r+b") as f:
        f.truncate(victim.offset_data + victim.size // 2)
    return len(keys) - keep_samples
