"""ImageNet-scale bounds, checked small: what a process holds does not grow with the data, the selection or the
replicas (D3 members, pass orders, open shards and blocks, the build's writer), and stored shard indexes are reused."""

from __future__ import annotations

import os
import pickle
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from shard_fixtures import write_shards

from data_pipes.shards.read import ShardFiles, index_path, load_index, read_run, scan_shard, write_index
from data_pipes.stream.members import Members, selection_arrays
from data_pipes.stream.mixture import MixtureStream, PassOrder, Rendered, SourceReader
from distill.kdset import KDSetError, block_path, read_block, record_dtype
from distill.render import BlockWriter, views_done
from distill.select import SCORE_DTYPE, SELECTION_LOCK, Selection, balance, select
from distill.views import StoredViews

# ------------------------------------------------------------------------------------------------ shard indexes


def test_a_stored_index_is_read_instead_of_scanning_the_shard(tmp_path, monkeypatch):
    root = write_shards(tmp_path / "s", train=(30, 20), val=(5,))
    shard = str(root / "train-000000.tar")
    write_index(shard)
    assert index_path(shard).is_file()
    expected = [s["__key__"] for _, s in read_run(shard, scan_shard(shard), 0, 30)]

    def no_scan(path):
        raise AssertionError(f"{path} was scanned although its index is stored")

    monkeypatch.setattr("data_pipes.shards.read.scan_shard", no_scan)
    files = ShardFiles()
    assert [s["__key__"] for _, s in files.read_run(shard, 0, 30)] == expected


def test_the_first_reader_stores_the_index_and_a_rewritten_shard_is_scanned_again(tmp_path):
    root = write_shards(tmp_path / "s", train=(30,), val=(5,))
    shard = str(root / "train-000000.tar")
    assert not index_path(shard).exists()
    ShardFiles().get(shard)
    assert load_index(shard) is not None  # stored beside the shard by the first reader
    other = write_shards(tmp_path / "t", train=(12,), val=(5,))  # another shard under the same name
    os.replace(other / "train-000000.tar", shard)
    assert load_index(shard) is None  # the stored index belongs to the old file
    assert len(ShardFiles().get(shard).offsets) == 12


def test_made_shards_come_with_their_indexes(synthetic_shards):
    for path in sorted(Path(synthetic_shards).glob("*.tar")):
        index = load_index(path)
        assert index is not None and len(index.offsets) == len(scan_shard(path).offsets), path


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reader_keeps_a_bounded_number_of_shards_open_however_many_it_reads(tmp_path):
    root = write_shards(tmp_path / "s", train=(3,) * 40, val=(2,))
    files, before = ShardFiles(capacity=8), open_descriptors()
    for k in range(40):
        assert len(list(files.read_run(str(root / f"train-{k:06d}.tar"), 0, 3))) == 3
        assert open_descriptors() - before <= 8 and len(files) <= 8
    files.close()
    assert open_descriptors() == before


# ------------------------------------------------------------------------------------------------ D3 selection


def old_balance(top, conf, num_classes, threshold, per_class):
    """The selection as the first version made it (one array entry per member): the reference for numbering."""
    passed = (conf >= 0) & (conf >= threshold)
    chosen = []
    for c in range(num_classes):
        mine = np.flatnonzero(passed & (top == c))
        mine = mine[np.lexsort((mine, -conf[mine]))][:per_class]
        chosen.append(np.resize(mine, per_class) if len(mine) else mine)
    return np.sort(np.concatenate(chosen).astype(np.int64), kind="stable")


@pytest.mark.parametrize("per_class", [1, 7, 50])
def test_the_sorted_selection_numbers_members_as_the_per_member_selection_did(per_class):
    rng = np.random.default_rng(per_class)
    top = rng.integers(0, 12, 400).astype(np.int32)
    conf = np.round(rng.uniform(-0.2, 1.0, 400), 2).astype(np.float32)  # ties and unreadable images included
    images, repeats, classes, counts = balance(top, conf, 12, 0.3, per_class)
    assert np.array_equal(np.repeat(images, repeats), old_balance(top, conf, 12, 0.3, per_class))
    assert (top[images] == classes).all() and sum(counts["after"]) == repeats.sum()


def write_selection(directory: Path, images, repeats) -> Selection:
    out = directory / "selection"
    out.mkdir(parents=True)
    images, ends = selection_arrays(images, repeats)
    np.save(out / "images.npy", images)
    np.save(out / "ends.npy", ends)
    np.save(out / "classes.npy", np.zeros(len(images), np.int32))
    (directory / "class_counts.json").write_text("{}")
    return Selection.load(directory)


class _Members:
    """A ViewSource stand-in over real members (what a worker holds is what is measured)."""

    labelled = False

    def __init__(self, members: Members) -> None:
        self.reader = SourceReader(members)

    def render(self, items):
        return [Rendered(np.zeros((4, 4, 3), np.uint8), -1, str(it.member)) for it in items]


@pytest.mark.parametrize("per_class", [10, 130_000])
def test_a_worker_holds_the_same_few_bytes_of_d3_whatever_per_class(tmp_path, per_class):
    # 1000 classes x 20 extra images over 100 shards, balanced to per_class: at the default 130,000 a class that
    # is 130M members, which the first version held as an int64 array in every rank and loader worker (~1 GB).
    shards = [(f"/data/extra-{k:06d}.tar", 200) for k in range(100)]
    images = np.arange(0, 20_000, dtype=np.int64)
    selection = write_selection(tmp_path, images, np.full(len(images), per_class // 20 or 1))
    tracemalloc.start()
    members = selection.members(shards)
    stream = MixtureStream([_Members(members)], names=["d3"], weights=[1], batch_size=64, batches_per_epoch=10,
                           seed=0, shuffle_window=1024, rank=3, world_size=8, student_size=4,
                           student_interpolation="bilinear", hflip=0.5)
    start = time.perf_counter()
    items = stream.batch_items(epoch=5, batch=7)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert members.count == len(images) * (per_class // 20 or 1)
    assert peak < 2_000_000 and seconds < 1.0  # the selection stays on disk, mapped; a pass is one window
    assert len(pickle.dumps(stream.sources)) < 20_000  # a spawned worker gets the maps' paths, not their contents
    assert len(items) == 64
    assert len({it.member for it in items}) == 64 and all(0 <= it.member < members.count for it in items)
    shard, local = members.locate([it.member for it in items])
    assert ((local >= 0) & (local < 200)).all() and (shard < 100).all()


def test_a_pass_over_130m_members_costs_one_window():
    tracemalloc.start()
    order = PassOrder(130_000_000, world_size=8, rank=5, seed=0, pass_=3, window=1024, chunk=1)
    picked = order.members(10_000_000, 10_002_048)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(set(picked.tolist())) == 2048 and peak < 1_000_000


def test_an_earlier_per_member_selection_file_still_loads(tmp_path):
    members = np.array([1, 1, 1, 4, 9, 9], np.int64)
    np.savez(tmp_path / "selection.npz", members=members, classes=np.zeros(6, np.int32))
    (tmp_path / "class_counts.json").write_text("{}")
    loaded = Selection.load(tmp_path).members([("a.tar", 5), ("b.tar", 5)])
    assert np.array_equal(loaded.samples(np.arange(6)), members) and loaded.num_blocks == 2


def test_one_process_makes_the_selection_while_the_others_wait(tmp_path):
    (tmp_path / "scores").mkdir()
    for k in range(2):
        np.save(tmp_path / "scores" / f"block-{k:06d}.npy", np.array([(k, 0.9), (1 - k, 0.8)], SCORE_DTYPE))
    args = {"label_names": ["a", "b"], "threshold": 0.3, "per_class": 3,
            "identity": {"threshold": 0.3, "per_class": 3}}
    (tmp_path / SELECTION_LOCK).write_text("another host 1\n")  # a live maker elsewhere
    with pytest.raises(KDSetError, match="being made by another process"):
        select(tmp_path, [("x", 2), ("y", 2)], deadline=time.time() + 0.5, **args)
    old = time.time() - 3600
    os.utime(tmp_path / SELECTION_LOCK, (old, old))  # its maker was killed long ago: taken over
    made = select(tmp_path, [("x", 2), ("y", 2)], deadline=time.time() + 30, **args)
    assert made.members([("x", 2), ("y", 2)]).count == 6 and not (tmp_path / SELECTION_LOCK).exists()


# ------------------------------------------------------------------------------------------------ kd sets


VIEW = np.dtype([("x", "<f4"), ("partner", "<i8")])
DTYPE = record_dtype(VIEW, num_classes=10, top_k=3)


def chunks(replicas: int, members: int, size: int, payload: int = 3000):
    """The chunks a renderer sends for one block, in view order (replica-major)."""
    total = replicas * members
    for at in range(0, total, size):
        views = [(v // members, v % members) for v in range(at, min(total, at + size))]
        records = np.zeros(len(views), VIEW)
        records["x"] = [r * 1000 + m for r, m in views]
        chunk = {"at": at, "views": views, "records": records.tobytes(), "ok": [m != 2 for _, m in views],
                 "encoded": [(bytes([r % 256, m % 256]) * (payload // 2), m % 10) for r, m in views],
                 "checksums": {f"{views[0][0]},{views[0][1]}": "abc"}}
        ids = np.tile(np.arange(3), (len(views), 1))
        probs = np.tile(np.array([0.5, 0.3, 0.1], np.float32), (len(views), 1))
        yield chunk, ids, probs


def write_block(directory: Path, replicas: int, members: int, size: int = 16, stop: int | None = None,
                flush: int = 32) -> BlockWriter:
    writer = BlockWriter(directory, SimpleNamespace(replicas=replicas), 0, members, DTYPE, "pixels",
                         flush_views=flush)
    for n, (chunk, ids, probs) in enumerate(chunks(replicas, members, size)):
        if chunk["at"] < writer.done:
            continue
        if stop is not None and n == stop:
            return writer
        writer.add(chunk, ids, probs)
    return writer


def test_the_block_writer_holds_one_chunk_whatever_the_replicas(tmp_path):
    peaks = {}
    for replicas in (2, 40):
        tracemalloc.start()
        write_block(tmp_path / str(replicas), replicas, members=50)
        peaks[replicas] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert read_block(tmp_path / str(replicas), 0).shape == (replicas, 50)
    # 40 replicas are 2,000 views of 3 KB (6 MB) that the first writer held until the block ended.
    assert peaks[40] < 1.5 * peaks[2] + 200_000, peaks


def test_a_killed_build_loses_only_the_views_since_the_last_flush_and_resumes_inside_the_block(tmp_path):
    whole = tmp_path / "whole"
    write_block(whole, replicas=5, members=20)
    cut = tmp_path / "cut"
    writer = write_block(cut, replicas=5, members=20, stop=5, flush=32)  # 80 views added, flushed at 64
    del writer  # killed: no finish, no further flush
    assert not block_path(cut, 0).exists() and views_done(cut, 0) == 64
    resumed = write_block(cut, replicas=5, members=20)
    assert resumed.remaining == 0 and views_done(cut, 0) == 0
    for suffix in (".npy", ".tar", ".check.json"):
        assert block_path(cut, 0, suffix).read_bytes() == block_path(whole, 0, suffix).read_bytes(), suffix
    assert load_index(block_path(cut, 0, ".tar")) is not None  # its index stored for the readers


def test_stored_views_keep_a_bounded_number_of_blocks_mapped(tmp_path):
    for block in range(12):
        np.save(block_path(tmp_path, block), np.zeros((1, 4), DTYPE))
    shards = [(f"s{k}.tar", 4) for k in range(12)]
    views = StoredViews(SimpleNamespace(mixes=False), SourceReader(Members(shards)), directory=tmp_path,
                        replicas=1, storage="params", labelled=False, open_blocks=3)
    for block in range(12):
        views._records(block)
        assert len(views._blocks) <= 3
