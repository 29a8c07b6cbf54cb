"""Read what an offline W&B run wrote: the history rows of a `run-<id>.wandb` file.

wandb 0.2x+ has no Python reader for its transaction log any more (wandb-core writes it); the format is LevelDB's
log format (32 KiB blocks, each record split into chunks with a 7-byte header: crc32, length, type), after a 7-byte
file header (":W&B", magic 0xBEE1, version), each record a `wandb_internal_pb2.Record` protobuf."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B transaction log ({ident!r}, {magic:#x})"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """Every history row (`run.log`) of the file, keys as logged, values decoded from JSON."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_config(path: Path) -> dict[str, Any]:
    """The run's config as W&B recorded it (the run record's values, then later config updates)."""
    config: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def artifacts(path: Path) -> list[dict[str, Any]]:
    """Every artifact the run logged (outputs) or used (inputs: `use_after_commit`), with its metadata and files."""
    out = []
    for record in records(path):
        if record.WhichOneof("record_type") == "artifact":
            a = record.artifact
            out.append({"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"),
                        "aliases": list(a.aliases), "input": a.use_after_commit, "digest": a.digest,
                        "files": [c.path for c in a.manifest.contents]})
    return out


def defined_metrics(path: Path) -> dict[str, str]:
    """`define_metric` declarations: metric (or glob) -> its step metric ("" when it has none)."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "metric":
            m = record.metric
            out[m.name or m.glob_name] = m.step_metric
    return out
