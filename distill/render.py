"""The build's work: loader workers render whole blocks of views, and the block writer stores them.

A task is one block (one source shard): every replica of every member, rendered in chunks of the teacher's batch
(replica-major), with the view's record (its parameters), its pixels resized to the teacher's resolution, and in
`pixels` storage its JPEG bytes. The writer streams a block's labelled chunks into its files, durable every
`FLUSH_VIEWS` views, so a killed build resumes inside the block; the records are renamed into place last (their
presence marks the block done: `distill.kdset`).
"""

from __future__ import annotations

import logging
import os
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
from data_pipes.shards.read import write_index
from data_pipes.stream.mixture import SourceReader
from distill.kdset import block_path, quantize, read_json, write_json
from distill.sources import SourceConfig
from distill.views import draw_view, peek_partner, view_rng

log = logging.getLogger("distill.build")
PARTIAL_RECORDS, PARTIAL_TAR, PROGRESS = ".npy.partial", ".tar.partial", ".progress.json"
FLUSH_VIEWS = 16384


@dataclass(frozen=True)
class Task:
    source: int  # index into the build's sources
    block: int
    start: int = 0  # views already written by an earlier, interrupted build (resumed from there)


class ViewRenderer(IterableDataset):
    """Loader workers render the views of whole blocks, in chunks of `chunk` views (replica-major): a worker holds
    one chunk's source bytes and views at a time, whatever the block's replicas."""

    def __init__(self, sources: list[SourceConfig], tasks: list[Task], seed: int, teacher_size: int,
                 teacher_interpolation: str, chunk: int, checks: int, storage: str) -> None:
        self.sources, self.tasks, self.seed, self.chunk, self.checks = sources, tasks, seed, chunk, checks
        self.teacher_size, self.teacher_interpolation, self.storage = teacher_size, teacher_interpolation, storage

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        readers = [SourceReader(s.members) for s in self.sources]  # one pool of open shards per source
        for n, task in enumerate(self.tasks):
            if n % workers == worker:
                yield from self._task(n, task, readers[task.source])

    def _task(self, n: int, task: Task, reader: SourceReader) -> Iterator[dict]:
        s = self.sources[task.source]
        first, end = s.members.block_range(task.block)
        members = end - first
        checked = check_positions(members, s.replicas, self.checks)
        total = s.replicas * members
        for at in range(task.start, total, self.chunk):
            views = [(v // members, first + v % members) for v in range(at, min(total, at + self.chunk))]
            partners = [peek_partner(reader, self.seed, s.index, r, m) for r, m in views] if s.recipe.mixes else []
            raw = reader.read([m for _, m in views] + partners)
            yield self._chunk(n, at, s, reader, raw, first, views, checked)

    def _chunk(self, n: int, at: int, s: SourceConfig, reader: SourceReader, raw: dict, first: int, views: list,
               checked) -> dict:
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
        return {"task": n, "at": at, "views": [(r, m - first) for r, m in views], "records": records.tobytes(),
                "ok": ok, "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), "encoded": encoded,
                "checksums": sums}


def check_positions(members: int, replicas: int, count: int) -> set[tuple[int, int]]:
    """The (replica, offset) of the views of a block whose checksums are stored: spread over both axes."""
    return {(j % replicas, (j * 7919) % members) for j in range(min(count, members * replicas))}


def _png(view: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(view[:, :, ::-1]))[1].tobytes()


def views_done(directory: Path, block: int) -> int:
    """Views of an interrupted block that a resumed build keeps (0 when it starts the block afresh)."""
    progress = block_path(directory, block, PROGRESS)
    if not (progress.is_file() and block_path(directory, block, PARTIAL_RECORDS).is_file()):
        return 0
    return int(read_json(progress)["views"])


class BlockWriter:
    """Writes one block's labelled views as they arrive, in view order (replica-major): each chunk's records into
    their place in the block's `.npy` (written in place, never held), its JPEGs appended to the block's tar.

    Every `flush_views` views it makes what it wrote durable (fsync) and records how far it got
    (`block-K.progress.json`): a killed build loses at most the views since the last flush (16,384 by default, about
    a minute of one GPU's labelling) and resumes the block there. Memory: one chunk, whatever the block's replicas
    (1,000 replicas of a 1 GB shard are ~1 TB of views in `pixels` storage, streamed). When the block is complete,
    the tar (then its index) and the check file are renamed into place, and the records last: their presence marks
    the block done (`distill.kdset`).
    """

    def __init__(self, directory: Path, s: SourceConfig, block: int, members: int, dtype: np.dtype, storage: str,
                 flush_views: int | None = None) -> None:
        self.directory, self.block, self.members, self.dtype = Path(directory), block, members, dtype
        self.replicas, self.flush_views = s.replicas, flush_views or FLUSH_VIEWS
        self.directory.mkdir(parents=True, exist_ok=True)
        self._records_path = block_path(self.directory, block, PARTIAL_RECORDS)
        self._tar_path = block_path(self.directory, block, PARTIAL_TAR) if storage == "pixels" else None
        self._progress = block_path(self.directory, block, PROGRESS)
        self.done = views_done(self.directory, block)
        state = read_json(self._progress) if self.done else {"tar_bytes": 0, "checksums": {}}
        if not self.done:
            np.lib.format.open_memmap(self._records_path, mode="w+", dtype=dtype, shape=(s.replicas, members))
        self._records = open(self._records_path, "r+b")  # noqa: SIM115 - held until the block is complete
        self._header = os.fstat(self._records.fileno()).st_size - s.replicas * members * dtype.itemsize
        self.checksums: dict[str, str] = dict(state["checksums"])
        self._tar = None
        if self._tar_path is not None:
            self._tar = open(self._tar_path, "r+b" if self.done else "wb")  # noqa: SIM115 - as above
            self._tar.seek(int(state["tar_bytes"]))
            self._tar.truncate()
        self._flushed = self.done

    @property
    def remaining(self) -> int:
        return self.replicas * self.members - self.done

    def add(self, chunk: dict, ids: np.ndarray, probs: np.ndarray) -> None:
        if chunk["at"] != self.done:
            raise RuntimeError(f"block {self.block}: views arrived out of order ({chunk['at']} after {self.done})")
        views = np.frombuffer(chunk["records"], dtype=self.dtype["view"])
        rows = np.zeros(len(views), dtype=self.dtype)
        rows["view"] = views
        ok = np.asarray(chunk["ok"], dtype=bool)
        rows["ids"][ok], rows["probs"][ok] = ids[ok], quantize(probs[ok])
        os.pwrite(self._records.fileno(), rows.tobytes(), self._header + self.done * self.dtype.itemsize)
        for (replica, offset), (data, target) in zip(chunk["views"], chunk["encoded"]):
            key = f"v{replica:05d}_{offset:07d}"
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(target).encode())):
                _append(self._tar, name, payload)
        self.checksums.update(chunk["checksums"])
        self.done += len(views)
        if self.remaining == 0:
            self._finish()
        elif self.done - self._flushed >= self.flush_views:
            self._flush()

    def _flush(self) -> None:
        os.fsync(self._records.fileno())
        tar_bytes = 0
        if self._tar is not None:
            self._tar.flush()
            os.fsync(self._tar.fileno())
            tar_bytes = self._tar.tell()
        write_json(self._progress, {"views": self.done, "tar_bytes": tar_bytes, "checksums": self.checksums})
        self._flushed = self.done

    def _finish(self) -> None:
        if self._tar is not None:
            _end_archive(self._tar)
            self._tar.flush()
            os.fsync(self._tar.fileno())
            self._tar.close()
            tar = block_path(self.directory, self.block, ".tar")
            os.replace(self._tar_path, tar)
            write_index(tar)
        write_json(block_path(self.directory, self.block, ".check.json"), self.checksums)
        os.fsync(self._records.fileno())
        self._records.close()
        os.replace(self._records_path, block_path(self.directory, self.block))
        self._progress.unlink(missing_ok=True)


def _append(f, name: str, payload: bytes) -> None:
    """One tar member, as tarfile's addfile writes it (ustar header, data, padding), without the TarInfo that a
    TarFile keeps for every member it wrote (2.5M of them for a 1,000-replica block)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    f.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    f.write(payload)
    f.write(bytes(-len(payload) % tarfile.BLOCKSIZE))


def _end_archive(f) -> None:
    """The end of a tar as tarfile's close writes it: two zero blocks, then zeros to a whole record."""
    f.write(bytes(2 * tarfile.BLOCKSIZE))
    f.write(bytes(-f.tell() % tarfile.RECORDSIZE))
