"""Write one shard (make_shards, step 3); runs in a worker process, one whole shard per task.

Each file is read once, checked to decode, and packed as it came (`jpg` = the file's bytes) unless resizing.
The tar is written under a temporary name, synced, and renamed into place only when complete; then its index
(each sample's byte offset, `<shard>.tar.idx`) is stored beside it for the readers.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from data_pipes.shards.plan import PARTIAL_SUFFIX
from data_pipes.shards.read import write_index
from data_pipes.shards.scan import Skip

VALIDATE_MODES = ("draft", "full")
DEFAULT_QUALITY = 90
# One fixed member time: the same inputs always give byte-identical shards.
MEMBER_MTIME = 1_700_000_000
WRITE_BUFFER = 16 << 20
PROGRESS_EVERY = 64


@dataclass(frozen=True)
class Recode:
    """How samples are checked and (optionally) re-encoded."""

    resize: int | None = None
    quality: int = DEFAULT_QUALITY
    validate: str = "draft"


@dataclass(frozen=True)
class ShardTask:
    out: str
    name: str
    fingerprint: str
    samples: tuple[tuple[str, str, int], ...]  # (absolute path, key, label)
    recode: Recode


@dataclass
class ShardResult:
    name: str
    fingerprint: str
    count: int
    bytes: int
    skipped: list[Skip] = field(default_factory=list)

    def record(self) -> dict:
        return {"shard": self.name, "fingerprint": self.fingerprint, "count": self.count, "bytes": self.bytes,
                "skipped": [[s.reason, s.path, s.detail] for s in self.skipped]}


def write_shard(task: ShardTask, progress: Callable[[int], object] | None = None) -> ShardResult:
    out = Path(task.out)
    tmp = out / (task.name + PARTIAL_SUFFIX)
    count, pending, skipped = 0, 0, []
    with open(tmp, "wb", buffering=WRITE_BUFFER) as f:
        with TarWriter(f, encoder=False, mtime=MEMBER_MTIME) as tar:
            for path, key, label in task.samples:
                data = load_sample(path, task.recode)
                if isinstance(data, Skip):
                    skipped.append(data)
                else:
                    tar.write({"__key__": key, "jpg": data, "cls": str(label).encode("ascii")})
                    count += 1
                pending += 1
                if progress and pending == PROGRESS_EVERY:
                    progress(pending)
                    pending = 0
        f.flush()
        os.fsync(f.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, out / task.name)
    write_index(out / task.name)  # every reader loads the offsets instead of walking 2 x 1,250 tar headers
    if progress and pending:
        progress(pending)
    return ShardResult(task.name, task.fingerprint, count, size, skipped)


def load_sample(path: str, recode: Recode) -> bytes | Skip:
    """The bytes to store for one image, or why it is left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Skip("unreadable", path, f"{type(e).__name__}: {e.strerror or e}")
    if not data:
        return Skip("empty", path, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC complaints are common in ImageNet and harmless
            with Image.open(io.BytesIO(data)) as im:
                return resized_jpeg(im, data, recode) if recode.resize else checked(im, data, recode.validate)
    except Image.UnidentifiedImageError:
        return Skip("not-an-image", path, "no image format recognises its content")
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError...) on bad data
        return Skip("corrupt", path, f"{type(e).__name__}: {e}")


def checked(im: Image.Image, data: bytes, validate: str) -> bytes:
    """Decode the whole stream (a truncated or broken file raises). `draft` lets libjpeg decode at 1/8 scale:
    every byte is still entropy-decoded, at a fraction of the cost."""
    if validate == "draft":
        im.draft(im.mode, (1, 1))
    im.load()
    return data


def resized_jpeg(im: Image.Image, data: bytes, recode: Recode) -> bytes:
    """Shorter side `recode.resize`, re-encoded as JPEG; images already that small keep their original bytes."""
    target = shorter_side_size(*im.size, recode.resize)
    if target is None:
        return checked(im, data, recode.validate)
    if recode.validate == "draft":
        im.draft(im.mode, target)  # JPEG: decode straight at the smallest DCT scale still >= target
    im.load()
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")  # CMYK, palette, alpha: JPEG wants RGB (grayscale stays grayscale)
    im = im.resize(target, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=recode.quality)
    return buf.getvalue()


def shorter_side_size(width: int, height: int, short: int) -> tuple[int, int] | None:
    """(w, h) with the shorter side `short` and the aspect ratio kept, or None where that would upscale."""
    if min(width, height) <= short:
        return None
    if width <= height:
        return short, max(short, round(height * short / width))
    return max(short, round(width * short / height)), short
