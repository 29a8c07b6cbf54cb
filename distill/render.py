"""The build's work: loader workers render whole blocks of views, and the block writer stores them.

A task is one block (one source shard): every replica of every member, rendered in chunks of the teacher's batch
(replica-major), with the view's record (its parameters), its pixels resized to the teacher's resolution, and in
`pixels` storage its JPEG bytes. The writer collects a block's labelled chunks and writes its files, the records
last (their presence marks the block done: `distill.kdset`).
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipes.image.decode import resize
from data_pipes.image.views import checksum
from data_pipes.stream.mixture import SourceReader
from distill.kdset import block_path, quantize, write_atomic, write_json
from distill.sources import SourceConfig
from distill.views import draw_view, peek_partner, view_rng

log = logging.getLogger("distill.build")


@dataclass(frozen=True)
class Task:
    source: int  # index into the build's sources
    block: int


class ViewRenderer(IterableDataset):
    """Loader workers render the views of whole blocks, in chunks of `chunk` views (replica-major)."""

    def __init__(self, sources: list[SourceConfig], tasks: list[Task], seed: int, teacher_size: int,
                 teacher_interpolation: str, chunk: int, checks: int, storage: str) -> None:
        self.sources, self.tasks, self.seed, self.chunk, self.checks = sources, tasks, seed, chunk, checks
        self.teacher_size, self.teacher_interpolation, self.storage = teacher_size, teacher_interpolation, storage

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for n, task in enumerate(self.tasks):
            if n % workers == worker:
                yield from self._task(n, task)

    def _task(self, n: int, task: Task) -> Iterator[dict]:
        s = self.sources[task.source]
        reader = SourceReader(s.blocks)
        first, end = int(reader.starts[task.block]), int(reader.starts[task.block + 1])
        raw = reader.read(range(first, end))
        checked = check_positions(end - first, s.replicas, self.checks)
        views = [(r, m) for r in range(s.replicas) for m in range(first, end)]
        for at in range(0, len(views), self.chunk):
            yield self._chunk(n, s, reader, raw, first, views[at:at + self.chunk], checked)

    def _chunk(self, n, s: SourceConfig, reader: SourceReader, raw: dict, first: int, views: list, checked) -> dict:
        records = np.zeros(len(views), dtype=s.recipe.dtype)
        images, ok, encoded, sums = [], [], [], {}
        for i, (replica, member) in enumerate(views):
            sample = raw[member]
            try:
                if isinstance(sample, str):
                    raise ValueError(sample)
                partner = peek_partner(reader, self.seed, s.index, replica, member) if s.recipe.mixes else None
                extra = {} if partner is None else {partner: raw[partner]["jpg"]}
                record = draw_view(s.recipe, reader, view_rng(self.seed, s.index, replica, member), member,
                                   sample["jpg"], extra)
                view, data = s.recipe.render_encoded(record, sample["jpg"], extra.get(partner))
                records[i] = record
                ok.append(True)
            except Exception as e:  # noqa: BLE001 - a view that cannot be made is stored empty and skipped later
                log.warning("kd source %s member %d replica %d: %s: %s", s.name, member, replica, type(e).__name__, e)
                view, data = np.zeros((s.recipe.size, s.recipe.size, 3), np.uint8), None
                ok.append(False)
            if (replica, member - first) in checked and ok[-1]:
                sums[f"{replica},{member - first}"] = checksum(view)
            images.append(resize(view, self.teacher_size, self.teacher_size, self.teacher_interpolation))
            if self.storage == "pixels":
                encoded.append((data if data is not None else _png(view),
                                int(sample["cls"]) if not isinstance(sample, str) and "cls" in sample else -1))
        # Structured arrays cross the worker boundary as bytes (the loader's collation would try to make tensors).
        return {"task": n, "views": [(r, m - first) for r, m in views], "records": records.tobytes(), "ok": ok,
                "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), "encoded": encoded,
                "checksums": sums}


def check_positions(members: int, replicas: int, count: int) -> set[tuple[int, int]]:
    """The (replica, offset) of the views of a block whose checksums are stored: spread over both axes."""
    return {(j % replicas, (j * 7919) % members) for j in range(min(count, members * replicas))}


def _png(view: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(view[:, :, ::-1]))[1].tobytes()


class BlockWriter:
    """Collects one block's labelled views and writes its files (tar, checksums, then the records last)."""

    def __init__(self, directory: Path, s: SourceConfig, members: int, dtype: np.dtype) -> None:
        self.directory, self.source, self.members = directory, s, members
        self.records = np.zeros((s.replicas, members), dtype=dtype)
        self.pixels: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.checksums: dict[str, str] = {}
        self.remaining = s.replicas * members

    def add(self, chunk: dict, ids: np.ndarray, probs: np.ndarray) -> None:
        views = np.frombuffer(chunk["records"], dtype=self.source.recipe.dtype)
        for i, (replica, offset) in enumerate(chunk["views"]):
            row = self.records[replica, offset]
            row["view"] = views[i]
            if chunk["ok"][i]:
                row["ids"], row["probs"] = ids[i], quantize(probs[i])
            if chunk["encoded"]:
                self.pixels[(replica, offset)] = chunk["encoded"][i]
        self.checksums.update(chunk["checksums"])
        self.remaining -= len(chunk["views"])

    def write(self, block: int) -> None:
        if self.pixels:
            write_atomic(block_path(self.directory, block, ".tar"), self._write_tar)
        write_json(block_path(self.directory, block, ".check.json"), self.checksums)
        write_atomic(block_path(self.directory, block), lambda f: np.save(f, self.records, allow_pickle=False))

    def _write_tar(self, f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for replica in range(self.source.replicas):
                for offset in range(self.members):
                    data, target = self.pixels[(replica, offset)]
                    key = f"v{replica:05d}_{offset:07d}"
                    ext = "jpg"
                    for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(target).encode())):
                        member = tarfile.TarInfo(name)
                        member.size, member.mtime = len(payload), 0
                        tar.addfile(member, io.BytesIO(payload))
