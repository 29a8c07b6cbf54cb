"""Shard plan and resume state (make_shards, step 2).

The plan is a pure function of the source listing and the options that shape the output (seed, shard size,
resize, quality): samples are shuffled across classes with a seeded RNG and cut into shards, and each shard gets
a fingerprint of its exact contents. `OUT/_plan.json` keeps the fingerprints and `OUT/_progress.jsonl` gets one
line per finished shard, so a rerun of the same command skips every shard that is already on disk, and a
different command is refused before it can mix two plans in one directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from data_pipes.shards.metadata import INFO_FILE
from data_pipes.shards.scan import Entry, Source
from data_pipes.shards.val_labels import ShardSourceError

PLAN_FILE = "_plan.json"
PROGRESS_FILE = "_progress.jsonl"
SKIPPED_FILE = "_skipped.txt"
PARTIAL_SUFFIX = ".partial"
LOCK_FILE = ".make_shards.lock"
PLAN_VERSION = 1
_TAR_BLOCK = 512
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes from '1e9', '1GB', '500MB', '1.5GiB', '4096' (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(text).lower())
    if not m:
        raise ShardSourceError(f"cannot read size {text!r}; write it like 1e9, 1GB, 500MB or 512MiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size <= 0:
        raise ShardSourceError(f"size {text!r} must be more than 0 bytes")
    return size


def tar_bytes(size: int) -> int:
    """Bytes one sample takes in the tar: a header and padded data for `jpg`, a header and one block for `cls`."""
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK + 2 * _TAR_BLOCK


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    entries: tuple[Entry, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass(frozen=True)
class Plan:
    options: dict
    shards: tuple[ShardSpec, ...]
    fingerprint: str

    def split_shards(self, split: str) -> list[ShardSpec]:
        return [s for s in self.shards if s.split == split]


def make_plan(source: Source, options: dict) -> Plan:
    """Options: seed, shard_bytes or samples_per_shard, resize, quality, byte_ratio (output/input bytes)."""
    shards = []
    for split, part in source.splits.items():
        for index, chunk in enumerate(cut_shards(shuffled(part.entries, options["seed"], split), options)):
            shards.append(ShardSpec(split, index, tuple(chunk), _fingerprint([split, index, options, chunk])))
    total = _fingerprint([PLAN_VERSION, options, [s.fingerprint for s in shards]])
    return Plan(options, tuple(shards), total)


def shuffled(entries: list[Entry], seed: int, split: str) -> list[Entry]:
    """A class-mixed order; a string seed hashes the same in every process and Python version."""
    order = list(entries)
    random.Random(f"make_shards/{seed}/{split}").shuffle(order)
    return order


def cut_shards(entries: list[Entry], options: dict) -> list[list[Entry]]:
    n = options.get("samples_per_shard")
    if n:
        return [entries[i:i + n] for i in range(0, len(entries), n)]
    return cut_by_bytes(entries, options["shard_bytes"], options.get("byte_ratio", 1.0))


def cut_by_bytes(entries: list[Entry], shard_bytes: int, ratio: float) -> list[list[Entry]]:
    """ceil(total / shard_bytes) shards of about equal bytes (no runt last shard), each at most about shard_bytes."""
    sizes = [tar_bytes(int(e.size * ratio)) for e in entries]
    total = sum(sizes)
    count = min(len(entries), max(1, math.ceil(total / shard_bytes)))
    shards, current, done = [], [], 0
    for entry, size in zip(entries, sizes):
        current.append(entry)
        done += size
        if done >= total * (len(shards) + 1) / count and len(shards) < count - 1:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return shards


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, default=_entry_json, separators=(",", ":")).encode()).hexdigest()[:32]


def _entry_json(e: Entry) -> list:
    return [e.rel, e.label, e.key, e.size]


# --- the output directory -----------------------------------------------------------------------------------


def our_files(out: Path) -> list[Path]:
    names = {INFO_FILE, PLAN_FILE, PROGRESS_FILE, SKIPPED_FILE}
    found = [p for p in out.iterdir() if p.name in names] if out.is_dir() else []
    for pattern in ("train-*.tar", "val-*.tar", "train-*.tar.idx", "val-*.tar.idx", f"*.tar{PARTIAL_SUFFIX}"):
        found += sorted(out.glob(pattern))
    return found


def read_plan_file(out: Path) -> dict | None:
    try:
        return json.loads((out / PLAN_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}


def open_output(out: Path, plan: Plan, src: Path, *, overwrite: bool) -> dict[str, dict]:
    """Make OUT ready for this plan; return the progress records of shards already finished on disk."""
    out.mkdir(parents=True, exist_ok=True)
    old = read_plan_file(out)
    if not overwrite and old and old.get("fingerprint") == plan.fingerprint:
        for partial in out.glob(f"*.tar{PARTIAL_SUFFIX}"):
            partial.unlink()  # left by an interrupted run; its shard is redone
        return finished_shards(out, plan)
    existing = our_files(out)
    if existing and not overwrite:
        raise ShardSourceError(mismatch_message(out, old, plan, src, existing))
    for path in existing:
        path.unlink()
    write_json_atomic(out / PLAN_FILE, {
        "version": PLAN_VERSION, "fingerprint": plan.fingerprint, "src": str(src), "options": plan.options,
        "shards": {s.name: s.fingerprint for s in plan.shards},
    })
    return {}


def finished_shards(out: Path, plan: Plan) -> dict[str, dict]:
    """Records of shards whose tar is on disk, complete, and made from the planned contents."""
    wanted = {s.name: s.fingerprint for s in plan.shards}
    records = {}
    path = out / PROGRESS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run killed while writing it
        if wanted.get(rec.get("shard")) == rec.get("fingerprint"):
            records[rec["shard"]] = rec
    return {name: rec for name, rec in records.items() if _tar_size(out / name) == rec.get("bytes")}


def _tar_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def mismatch_message(out: Path, old: dict | None, plan: Plan, src: Path, existing: list[Path]) -> str:
    fix = ("Rerun with the options that made it to finish it, use another --out, or add --overwrite to delete "
           "its shards and metadata and start over.")
    if not old:
        return (f"--out {out} already holds {len(existing)} shard/metadata file(s) (first: {existing[0].name}) "
                f"but no readable {PLAN_FILE}, so they were not made by this plan. {fix}")
    changed = [f"{k}: {old.get('options', {}).get(k)!r} -> {v!r}" for k, v in plan.options.items()
               if old.get("options", {}).get(k) != v]
    if old.get("src") != str(src):
        changed.insert(0, f"src: {old.get('src')} -> {src}")
    if not changed:
        old_shards = old.get("shards", {})
        differ = sum(old_shards.get(s.name) != s.fingerprint for s in plan.shards)
        changed = [f"the source files changed since then ({differ} of {len(plan.shards)} planned shards differ: "
                   f"images added, removed, renamed or resized)"]
    return f"--out {out} holds shards of a different plan ({'; '.join(changed)}). {fix}"


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold OUT's lock: two runs writing the same shard names would corrupt each other's files."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise ShardSourceError(f"another make_shards is writing to --out {out} (it holds {out / LOCK_FILE});"
                                       f" wait for it to finish or stop it, then rerun to resume") from e
            # filesystems without flock (some NFS mounts): run unlocked rather than not at all
        yield


def append_progress(out: Path, record: dict) -> None:
    """One line per finished shard, synced, so a crash loses at most the shard being written."""
    with open(out / PROGRESS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
