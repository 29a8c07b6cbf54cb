"""ShardDataModule, build_eval_loader and DataHealthMonitor, on tiny shards (CPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from shard_fixtures import PilDecode, sample_key, write_shards
from tiny_modules import KeyRecorder

from data_pipes.shards.metadata import DatasetError
from data_pipes.stream.datamodule import DataHealthMonitor, ShardDataModule, build_eval_loader
from data_pipes.stream.loader import DataError

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
]

VAL = (13, 2, 10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("dm"), (37, 5, 30, 1, 23), VAL, num_classes=4)


def datamodule(root, **kw) -> ShardDataModule:
    args = dict(batch_size=8, num_workers=0, train_transform=PilDecode(16), eval_transform=PilDecode(16), seed=0,
                shuffle_window=1024, max_bad_fraction=0.01)
    return ShardDataModule(str(root), **{**args, **kw})


def trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)
    return pl.Trainer(**{**args, **kw})


def test_the_dataset_is_known_before_a_trainer_exists(shards):
    dm = datamodule(shards, val_batch_size=4)
    assert dm.label_names == ("class0", "class1", "class2", "class3") and dm.num_classes == 4
    assert (dm.num_train_samples, dm.num_val_samples) == (96, 25)
    assert [dm.steps_per_epoch(w) for w in (1, 2, 3, 8)] == [12, 6, 4, 1]
    assert [dm.val_steps(w) for w in (1, 2, 3)] == [7, 4, 3]


def test_a_bad_root_fails_at_construction_with_the_metadata_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datamodule(tmp_path / "nowhere")


def test_loader_lengths_are_batches_per_rank_and_memory_is_not_pinned_on_cpu(shards):
    dm = datamodule(shards, val_batch_size=4)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (len(train), len(val)) == (12, 7)
    assert not train.pin_memory and not val.pin_memory
    assert len(list(train)) == 12 and len(list(val)) == 7


def test_build_eval_loader_yields_every_image_of_the_split_once_in_order(shards):
    loader = build_eval_loader(str(shards), PilDecode(16), batch_size=4, num_workers=2, max_bad_fraction=0.0)
    keys = [k for b in loader for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert keys == [sample_key("val", s, i) for s, n in enumerate(VAL) for i in range(n)]


def test_the_state_is_empty_outside_fit_and_a_changed_plan_warns_on_restore(shards):
    dm = datamodule(shards)
    assert dm.state_dict() == {}
    state = {"format": 1, "epoch": 0, "window_batches_done": [1] + [0] * 23,
             "num_samples": 96, "world_size": 1, "batch_size": 4, "shuffle_window": 1024, "seed": 0}
    with pytest.warns(UserWarning, match="different data plan"):
        dm.load_state_dict(state)
    assert dm._train_position() == (0, [1])  # one window; the new plan's first batch stands for the consumed one


SPREAD_BAD = {sample_key("train", s, 5): "corrupt_jpeg" for s in range(4)}  # one per shard, one per window


@pytest.fixture(scope="module")
def spread_bad(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("bad"), (16, 16, 16, 16), (6, 6), num_classes=4, bad=SPREAD_BAD)


def test_the_health_monitor_logs_bad_samples_per_epoch_and_val_images(spread_bad):
    dm = datamodule(spread_bad, num_workers=2, shuffle_window=16, max_bad_fraction=0.1)
    t = trainer(callbacks=dm.callbacks())
    t.fit(KeyRecorder(4), datamodule=dm)
    assert t.callback_metrics["data/bad_samples"] == 4
    assert t.callback_metrics["data/bad_fraction"] == pytest.approx(4 / 64)
    assert t.callback_metrics["data/val_images"] == 12


def test_the_health_monitor_stops_a_run_whose_bad_samples_exceed_the_limit(spread_bad):
    # Two bad samples per worker stay under each worker's allowance (3.2); the epoch's four do not.
    dm = datamodule(spread_bad, num_workers=2, shuffle_window=16, max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"4 of 64 'train' samples") as err:
        trainer(callbacks=[DataHealthMonitor()], limit_val_batches=0).fit(KeyRecorder(4), datamodule=dm)
    assert "train_000_0005" in str(err.value) and "max_bad_fraction=0.05" in str(err.value)


def test_the_health_monitor_stops_mid_epoch_once_the_epoch_allowance_is_spent(tmp_path):
    bad = {sample_key("train", s, i): "empty" for s in range(4) for i in (5, 9)}
    root = write_shards(tmp_path / "early", (16, 16, 16, 16), (6,), num_classes=4, bad=bad)
    dm = datamodule(root, num_workers=2, shuffle_window=16, max_bad_fraction=0.05)
    module = KeyRecorder(4)
    # Each worker's first window holds 2 bad samples: after 4 batches the rank has seen 4 > 0.05 * 64.
    with pytest.raises(DataError, match="'train' samples could not be read"):
        trainer(callbacks=[DataHealthMonitor(check_every_n_batches=1)], limit_val_batches=0).fit(module, datamodule=dm)
    assert module.train_batches == 4


def test_a_process_that_raises_while_its_loader_workers_live_still_exits():
    """Loader workers ignore the job's SIGTERM (the trainer acts on it); a run that dies with its workers alive must
    not then wait forever for them at exit (multiprocessing's exit hook SIGTERMs and joins them)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch.utils.data import DataLoader, IterableDataset\n"
        "from data_pipes.stream.loader import init_loader_worker\n"
        "class Forever(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        while True:\n"
        "            yield torch.zeros(1)\n"
        "loader = DataLoader(Forever(), batch_size=None, num_workers=2, worker_init_fn=init_loader_worker,\n"
        "                    persistent_workers=True)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "raise SystemExit(3)  # the iterator, and its workers, are still alive\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]
