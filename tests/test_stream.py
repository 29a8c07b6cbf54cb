"""The sample stream: the epoch plan (pure functions), the loader following it, and bad data."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from shard_fixtures import PilDecode, sample_key, sample_label, truncate_tar, write_shards

from data_pipes.shards.metadata import read_info
from data_pipes.stream.loader import DataError, ShardLoader, ShardStream
from data_pipes.stream.plan import (
    EpochLayout,
    deliver,
    fresh_streams,
    progress_of,
    resume_streams,
    train_batches_per_rank,
    train_windows,
    val_batches_per_rank,
    val_windows,
    window_size,
)

UNEVEN = (37, 5, 61, 1, 20, 3)  # 127 samples
NUM_CLASSES = 4


def rank_positions(num_samples, world, rank, batch, window, seed=0, epoch=0):
    return [p for w in train_windows(num_samples, world, rank, batch, window, seed, epoch) for p in w.positions]


# ---------------------------------------------------------------- planner


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_every_rank_gets_the_same_whole_batches_whatever_the_shard_sizes(world, batch):
    n = sum(UNEVEN)
    expected = train_batches_per_rank(n, world, batch)
    window = window_size(batch, 10)
    for rank in range(world):
        windows = train_windows(n, world, rank, batch, window, seed=3, epoch=1)
        assert all(len(w.positions) % batch == 0 for w in windows)
        assert sum(len(w.positions) for w in windows) == expected * batch
    assert expected == (n // world) // batch


def test_fewer_shards_than_ranks_times_workers_still_feeds_every_rank_equally():
    lengths, world, workers, batch = (30, 9), 4, 3, 2  # 2 shards for 12 workers
    n = sum(lengths)
    counts = []
    for rank in range(world):
        windows = train_windows(n, world, rank, batch, window_size(batch, 2), seed=0, epoch=0)
        streams = fresh_streams([len(w.positions) // batch for w in windows], workers)
        assert sum(len(s) for s in streams) == len(deliver(streams))
        counts.append(len(deliver(streams)))
    assert counts == [train_batches_per_rank(n, world, batch)] * world == [4] * world


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 8), (3, 5), (4, 16)])
def test_a_training_epoch_reads_each_sample_at_most_once_and_drops_only_the_remainder(world, batch):
    n = sum(UNEVEN)
    seen = [p for r in range(world) for p in rank_positions(n, world, r, batch, window_size(batch, 12))]
    assert len(seen) == len(set(seen)) == world * train_batches_per_rank(n, world, batch) * batch
    assert set(seen) <= set(range(n))
    per_rank = n // world
    assert n - len(seen) == (n - world * per_rank) + world * (per_rank % batch)


def test_the_same_seed_and_epoch_give_the_same_order_and_other_epochs_or_seeds_differ():
    def samples(seed, epoch):
        layout = EpochLayout.build(UNEVEN, seed, epoch, shuffle=True)
        return [layout.locate(p) for p in rank_positions(sum(UNEVEN), 2, 1, 4, 8, seed, epoch)]

    assert samples(7, 3) == samples(7, 3)
    assert samples(7, 3) != samples(7, 4)
    assert samples(7, 3) != samples(8, 3)


def test_the_dropped_samples_change_from_epoch_to_epoch():
    n, world, batch = sum(UNEVEN), 2, 8

    def kept(epoch):
        layout = EpochLayout.build(UNEVEN, 0, epoch, shuffle=True)
        return {layout.locate(p) for r in range(world) for p in rank_positions(n, world, r, batch, 8, 0, epoch)}

    assert len({frozenset(kept(e)) for e in range(4)}) > 1


@pytest.mark.parametrize("n,world,batch", [(127, 1, 8), (127, 2, 8), (25, 2, 4), (10, 4, 3), (3, 5, 2), (64, 4, 16)])
def test_validation_covers_every_sample_exactly_once_over_ranks(n, world, batch):
    valid_positions, counts = [], []
    for rank in range(world):
        windows = val_windows(n, world, rank, batch, window_size(batch, 6))
        items = [(p, v) for w in windows for p, v in zip(w.positions, w.valid)]
        counts.append(len(items) // batch)
        assert len(items) % batch == 0
        assert all(0 <= p < n for p, _ in items)  # padding repeats a real sample
        valid_positions += [p for p, v in items if v]
    assert sorted(valid_positions) == list(range(n))
    assert counts == [val_batches_per_rank(n, world, batch)] * world


@pytest.mark.parametrize("lengths", [(1,), (5, 3), UNEVEN, (64, 64), (65,), (200, 1, 999)])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_the_chunked_epoch_order_holds_every_sample_once(lengths, chunk):
    layout = EpochLayout(lengths, seed=2, epoch=5, shuffle=True, chunk=chunk)
    n = sum(lengths)
    sources = layout.source_positions(np.arange(n))
    assert sorted(sources.tolist()) == list(range(n))
    shard, local = layout.locate_many(np.arange(n))
    assert all(0 <= i < lengths[s] for s, i in zip(shard, local))


def test_a_window_is_read_as_runs_of_one_shard_that_cover_it_exactly():
    layout = EpochLayout((300, 7, 500, 90), seed=1, epoch=2, shuffle=True, chunk=16)
    runs = layout.runs(100, 612)
    assert sum(end - first for _, first, end, _ in runs) == 512
    for shard, first, end, position in runs:
        assert [layout.locate(position + i) for i in range(end - first)] == [(shard, i) for i in range(first, end)]
    assert len(runs) <= 512 // 16 + 2 + 3  # a chunk is one run unless it crosses a shard end


def test_a_training_batch_draws_from_many_shards_and_batch_mates_rarely_meet_again():
    # ImageNet-like shards (1,281 samples), a 1024-sample shuffle window cut into batches of 128: a batch takes
    # ~8 samples from each of 16 chunks all over the data. Read in shard order it would be 1-2 shards and every
    # pair would meet again each epoch; fully random, 128 / N of them would.
    lengths, batch, window = [1281] * 100, 128, 1024
    n = sum(lengths)

    def epoch_batches(epoch):
        layout = EpochLayout(lengths, seed=0, epoch=epoch, shuffle=True)
        return [layout.source_positions(np.asarray(w.positions[i:i + batch]))
                for w in train_windows(n, 1, 0, batch, window, seed=0, epoch=epoch)
                for i in range(0, len(w.positions), batch)]

    first, second = epoch_batches(0), epoch_batches(1)
    starts = np.cumsum([0] + lengths)
    shards = [len(np.unique(np.searchsorted(starts, b, side="right"))) for b in first]
    assert np.median(shards) >= 14
    batch_of = np.empty(n, dtype=np.int64)
    for i, b in enumerate(second):
        batch_of[b] = i
    meet_again = [(c * (c - 1)).sum() / (len(b) * (len(b) - 1))
                  for b in first for c in [np.unique(batch_of[b], return_counts=True)[1]]]
    assert np.mean(meet_again) < 0.02


def test_validation_reads_the_dataset_in_order():
    layout = EpochLayout.build(UNEVEN, seed=5, epoch=9, shuffle=False)
    assert [layout.locate(p) for p in range(4)] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert layout.locate(37) == (1, 0)


def test_window_is_the_shuffle_window_rounded_up_to_whole_batches():
    assert window_size(8, 20) == 24
    assert window_size(8, 0) == 8
    assert window_size(256, 1024) == 1024


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_resuming_with_the_same_workers_continues_the_interrupted_order(workers):
    window_batches = [3, 3, 3, 1, 3, 2]
    full = deliver(fresh_streams(window_batches, workers))
    for k in range(len(full) + 1):
        done = progress_of(window_batches, full[:k])
        assert deliver(resume_streams(window_batches, workers, done)) == full[k:]


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (4, 2), (1, 5)])
def test_resuming_with_another_worker_count_yields_exactly_the_unconsumed_batches(before, after):
    window_batches = [4, 4, 4, 4, 2]
    full = deliver(fresh_streams(window_batches, before))
    for k in range(len(full) + 1):
        done = progress_of(window_batches, full[:k])
        rest = deliver(resume_streams(window_batches, after, done))
        assert Counter(full[:k]) + Counter(rest) == Counter(full)
        # A second resume (back to the first worker count) still lines up exactly.
        again = progress_of(window_batches, full[:k] + rest[: len(rest) // 2])
        assert sorted(deliver(resume_streams(window_batches, before, again))) == sorted(rest[len(rest) // 2 :])


def test_resume_progress_that_does_not_fit_the_windows_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        resume_streams([2, 2], 2, [3, 0])


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), UNEVEN, (13, 2, 10), num_classes=NUM_CLASSES)


def make_stream(root, split="train", **kw):
    info = read_info(root)
    args = dict(transform=PilDecode(16), batch_size=8, train=split == "train", seed=11, shuffle_window=20,
                max_bad_fraction=0.01, num_classes=NUM_CLASSES, split=split)
    return ShardStream(info.shards(split), **{**args, **kw})


def planned_keys(stream, epoch, workers, done=None, split="train"):
    return [[sample_key(split, s, i) for s, i, _ in batch] for batch in stream.planned_batches(epoch, workers, done)]


@pytest.mark.parametrize("rank", [0, 1])
def test_the_loader_with_two_workers_delivers_the_planned_batches(shards, rank):
    stream = make_stream(shards, rank=rank, world_size=2)
    batches = list(ShardLoader(stream, num_workers=2))
    assert [b["key"] for b in batches] == planned_keys(stream, 0, 2)
    assert len(batches) == len(stream) == train_batches_per_rank(sum(UNEVEN), 2, 8)
    for b in batches:
        labels = [sample_label(int(k[6:9]), int(k[10:]), NUM_CLASSES) for k in b["key"]]
        assert b["target"].tolist() == labels
        assert b["valid"].all() and int(b["bad"]) == 0


def test_two_shards_feed_two_ranks_of_two_workers_equally_and_disjointly(tmp_path):
    root = write_shards(tmp_path / "two", (29, 4), (3,), num_classes=NUM_CLASSES)
    per_rank = [[k for b in ShardLoader(make_stream(root, rank=r, world_size=2, batch_size=4, shuffle_window=4),
                                        num_workers=2) for k in b["key"]] for r in range(2)]
    assert [len(keys) for keys in per_rank] == [16, 16]
    assert len(set(per_rank[0] + per_rank[1])) == 32


def test_a_batch_follows_the_contract(shards):
    batch = next(iter(ShardLoader(make_stream(shards), num_workers=0)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["target"].dtype == torch.int64 and batch["valid"].dtype == torch.bool
    assert batch["bad"].dtype == torch.int64 and batch["bad"].ndim == 0
    assert isinstance(batch["key"], list) and len(batch["key"]) == 8


def test_a_transform_breaking_the_array_contract_is_reported_not_counted_as_bad_data(shards):
    def as_float(data: bytes):
        return PilDecode(16)(data).astype(np.float32)

    with pytest.raises(TypeError, match="HWC uint8 RGB"):
        next(iter(ShardLoader(make_stream(shards, transform=as_float))))


def test_persistent_workers_follow_the_epoch_set_before_each_iteration(shards):
    stream = make_stream(shards)
    loader = ShardLoader(stream, num_workers=2, persistent_workers=True, prefetch_factor=2)
    seen = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        seen.append([b["key"] for b in loader])
        assert seen[-1] == planned_keys(stream, epoch, 2)
    assert seen[0] == seen[2] != seen[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers_after", [2, 3, 0])
def test_the_loader_resumes_mid_epoch_with_exactly_the_batches_not_consumed(shards, workers_after):
    stream = make_stream(shards, shuffle_window=16)
    loader = ShardLoader(stream, num_workers=2)
    loader.set_epoch(4)
    full = [b["key"] for b in loader]
    consumed = 5
    done = loader.progress_after(4, consumed)
    resumed = ShardLoader(make_stream(shards, shuffle_window=16), num_workers=workers_after,
                          position=lambda: (4, done))
    rest = [b["key"] for b in resumed]
    if workers_after == 2:
        assert rest == full[consumed:]  # the same order as the uninterrupted epoch
    assert sorted(full[:consumed] + rest) == sorted(full)


class NoisyDecode(PilDecode):
    """PilDecode plus noise from numpy's global generator, as a random augmentation would draw it."""

    def __call__(self, data: bytes):
        image = super().__call__(data).astype(np.int16) + np.random.randint(-20, 21, (self.size, self.size, 3))
        return np.clip(image, 0, 255).astype(np.uint8)


def test_a_resumed_batch_is_augmented_exactly_as_in_the_uninterrupted_epoch(shards):
    stream = make_stream(shards, transform=NoisyDecode(16), shuffle_window=16)
    full = list(ShardLoader(stream, num_workers=2))
    again = list(ShardLoader(stream, num_workers=2))
    done = ShardLoader(stream, num_workers=2).progress_after(0, 5)
    resumed = list(ShardLoader(stream, num_workers=1, position=lambda: (0, done)))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again))
    by_keys = {tuple(b["key"]): b["image"] for b in full}
    assert all(torch.equal(by_keys[tuple(b["key"])], b["image"]) for b in resumed)  # even with other workers
    assert not torch.equal(full[0]["image"], full[1]["image"])


def test_validation_loader_pads_with_invalid_repeats(shards):
    n = 25
    keys, pads = [], 0
    for rank in range(3):
        stream = make_stream(shards, split="val", rank=rank, world_size=3, batch_size=4)
        for b in ShardLoader(stream, num_workers=2):
            keys += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
            pads += int((~b["valid"]).sum())
        assert len(stream) == val_batches_per_rank(n, 3, 4)
    assert sorted(keys) == sorted(sample_key("val", s, i) for s, m in enumerate((13, 2, 10)) for i in range(m))
    assert pads == 3 * val_batches_per_rank(n, 3, 4) * 4 - n


# ---------------------------------------------------------------- bad data

BAD = {"train_000_0003": "corrupt_jpeg", "train_001_0001": "truncated_jpeg", "train_002_0010": "empty",
       "train_002_0011": "not_image"}


@pytest.fixture()
def bad_shards(tmp_path):
    root = write_shards(tmp_path / "bad", (16, 8, 24, 16), (8,), num_classes=NUM_CLASSES, bad=BAD)
    lost = truncate_tar(root / "train-000003.tar", keep_samples=10)  # samples 10..15 cut off
    return root, len(BAD) + lost


def test_every_kind_of_bad_sample_is_replaced_in_its_batch_and_counted(bad_shards):
    root, expected_bad = bad_shards
    stream = make_stream(root, max_bad_fraction=0.5)  # 64 samples, 8 batches: nothing dropped
    batches = list(ShardLoader(stream, num_workers=2))
    assert len(batches) == 8 and all(b["image"].shape == (8, 3, 16, 16) for b in batches)
    assert sum(int(b["bad"]) for b in batches) == expected_bad == 10
    assert sum(int((~b["valid"]).sum()) for b in batches) == expected_bad
    named = " ".join(k for b in batches for k in b["bad_keys"])
    assert all(key in named for key in BAD) and "train-000003.tar" in named and "cut off" in named
    for b in batches:  # a stand-in is a good sample of the same batch: image and target agree
        for i in torch.nonzero(~b["valid"]).flatten().tolist():
            twins = [j for j in range(8) if b["valid"][j] and torch.equal(b["image"][j], b["image"][i])]
            assert twins and all(b["target"][j] == b["target"][i] for j in twins)


def test_more_bad_samples_than_allowed_stop_with_an_error_naming_them(bad_shards):
    root, _ = bad_shards
    with pytest.raises(DataError, match="max_bad_fraction") as err:
        list(ShardLoader(make_stream(root, max_bad_fraction=0.01), num_workers=0))
    assert "train_00" in str(err.value) and "data_pipes.shards.make" in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_a_tar"])
def test_an_unreadable_shard_is_an_error_naming_the_file_and_the_fix(bad_shards, damage):
    root, _ = bad_shards
    stream = make_stream(root, max_bad_fraction=0.2)  # 12.8 samples allowed; the shard has 24
    shard = root / "train-000002.tar"  # damaged after the run started (read_info refuses a missing one up front)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        truncate_tar(shard, keep_samples=3)
    else:
        shard.write_bytes(b"<html>404 not found</html>" * 40)
    with pytest.raises(DataError, match=r"cannot read shard .*train-000002\.tar") as err:
        list(ShardLoader(stream, num_workers=2))
    assert "copy it again" in str(err.value) and "max_bad_fraction" in str(err.value)


def test_a_missing_shard_is_skipped_when_the_bad_fraction_allows(bad_shards):
    root, expected_bad = bad_shards
    stream = make_stream(root, max_bad_fraction=0.6)
    (root / "train-000002.tar").unlink()  # 24 samples, two of them already bad
    batches = list(ShardLoader(stream, num_workers=2))
    assert len(batches) == 8
    assert sum(int(b["bad"]) for b in batches) == expected_bad - 2 + 24


def test_bad_validation_samples_are_not_counted_as_evaluated(tmp_path):
    root = write_shards(tmp_path / "v", (8,), (6, 5), num_classes=NUM_CLASSES,
                        bad={"val_000_0002": "empty", "val_001_0004": "not_image"})
    batches = list(ShardLoader(make_stream(root, split="val", batch_size=4, max_bad_fraction=0.5), num_workers=0))
    valid = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert len(valid) == 9 and "val_000_0002" not in valid and "val_001_0004" not in valid
    assert sum(int(b["bad"]) for b in batches) == 2


def test_a_batch_with_no_good_sample_borrows_one_so_shapes_stay_static(tmp_path):
    # Validation reads in dataset order: its first batch is the first shard, every sample of which is bad.
    bad = {sample_key("val", 0, i): "empty" for i in range(4)}
    root = write_shards(tmp_path / "b", (8,), (4, 4), num_classes=NUM_CLASSES, bad=bad)
    stream = make_stream(root, split="val", batch_size=4, shuffle_window=4, max_bad_fraction=0.6)
    batches = list(ShardLoader(stream, num_workers=0))
    assert [int(b["bad"]) for b in sorted(batches, key=lambda b: -int(b["bad"]))] == [4, 0]
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)


def test_shard_sizes_that_disagree_with_the_tar_count_as_cut_off_samples(tmp_path):
    root = write_shards(tmp_path / "c", (8, 8), (2,), num_classes=NUM_CLASSES)
    lengths = [(p, n + 2 if i == 0 else n) for i, (p, n) in enumerate(read_info(root).shards("train"))]
    stream = ShardStream(lengths, transform=PilDecode(16), batch_size=6, train=True, seed=0, shuffle_window=24,
                         max_bad_fraction=0.5)
    batches = list(ShardLoader(stream))
    reasons = [k for b in batches for k in b["bad_keys"]]
    assert sum(int(b["bad"]) for b in batches) == len(reasons) == 2 and all("cut off" in r for r in reasons)


def test_a_dataset_smaller_than_one_batch_per_rank_is_refused(shards):
    with pytest.raises(DataError, match="smaller batch size"):
        make_stream(shards, world_size=16, batch_size=8)


def test_worker_streams_read_each_window_in_one_run():
    # The worker streams list each window's batches contiguously, which the reader relies on.
    for workers in (1, 2, 3):
        for stream in resume_streams([3, 2, 4], workers, [1, 0, 2]):
            windows = [w for w, _ in itertools.groupby(stream, key=lambda ref: ref[0])]
            assert len(windows) == len(set(windows))
