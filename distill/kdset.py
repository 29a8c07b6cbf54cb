"""The on-disk layout of a built distillation set (`kd.sets`), and how it is read back.

    <kd.sets>/manifest.json          written last: teacher (source, weights hash, data config), class names, source
                                     shard sets (root + hash of _info.json), each source's recipe, replicas, counts,
                                     storage mode, top-k, library versions
    <kd.sets>/_build.json            the build's identity; a different config is refused in the same directory
    <kd.sets>/<source>/block-KKKKKK.npy        [replicas, members of block K] records: the view's parameters
                                               (`data_pipes.image.views`) + the teacher's top-k ids and probabilities
    <kd.sets>/<source>/block-KKKKKK.tar        `pixels` storage: the views' JPEG bytes (member-major per replica)
    <kd.sets>/<source>/block-KKKKKK.check.json checksums of a few views' pixels, re-rendered when training starts
    <kd.sets>/d3/scores/block-KKKKKK.npy       the selector's top class and confidence of each extra image
    <kd.sets>/<source>/block-KKKKKK.tar.idx    the tar's sample offsets (`data_pipes.shards.read`)
    <kd.sets>/<source>/block-KKKKKK.{npy,tar}.partial, .progress.json   a block being built (resumed there)
    <kd.sets>/d3/selection/{images,ends,classes}.npy  D3's selected extra images (sorted), where each one's
                                               copies end among the members (rare classes repeated), their classes
    <kd.sets>/d3/class_counts.json, .png       per-class counts before and after balancing (`distill.select`)

A block is one shard of the source; its .npy is renamed into place last, so its presence means the block is done.
Probabilities are stored as uint16 floor(p * 65535): a view's stored top-k never sums to more than 1 (flooring only
removes mass), and what is missing from 1 is the teacher's mass outside the top-k (see `kd.missing_mass`).
Class ids are integers (uint16 up to 65535 classes, else int32), never floats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipes.errors import UserError

MANIFEST = "manifest.json"
BUILD_FILE = "_build.json"
PROB_SCALE = 65535
RESUME_HINT = "run the same `python -m distill.build ...` command again: it resumes where it stopped"


class KDSetError(UserError, ValueError):
    """A kd set that is missing, partly built, or built for something else; the message says what to do."""


def label_dtype(num_classes: int, top_k: int) -> list[tuple]:
    ids = "<u2" if num_classes <= np.iinfo(np.uint16).max + 1 else "<i4"
    return [("ids", ids, (top_k,)), ("probs", "<u2", (top_k,))]


def record_dtype(view_dtype: np.dtype, num_classes: int, top_k: int) -> np.dtype:
    return np.dtype([("view", view_dtype), *label_dtype(num_classes, top_k)])


def quantize(probs: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(probs, 0.0, 1.0) * PROB_SCALE).astype(np.uint16)


def dequantize(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32) / PROB_SCALE


def block_path(directory: Path, block: int, suffix: str = ".npy") -> Path:
    return Path(directory) / f"block-{block:06d}{suffix}"


def read_block(directory: Path, block: int) -> np.ndarray:
    """A block's records, memory-mapped (plain numpy, no pickle)."""
    return np.load(block_path(directory, block), mmap_mode="r", allow_pickle=False)


def write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may write the same file
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
