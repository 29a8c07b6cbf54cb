"""A run stopped and resumed from its last checkpoint ends exactly where an uninterrupted run ends, with dropout,
drop-path and Mixup/CutMix on (every rank's RNG states are in the checkpoint)."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_run
from lightning.pytorch.loggers import WandbLogger
from preemption import PreemptAt, PreemptBeforeValidation, Preemption, SignalAt

import train.run as run_module
from train.cluster.requeue import Requeued, Stopped
from train.run import train
from train.tracking.loggers import ServiceSafeWandbLogger, close_loggers

STEPS_PER_EPOCH = 12  # 200 train images of the synthetic shards, batch 16


def run(root: Path, run_dir: Path, *overrides: str, callbacks=()) -> dict[str, float]:
    cfg = compose_run(
        f"run_dir={run_dir}", f"data.root={root}", "data.batch_size=16", "data.num_workers=2", "trainer.max_epochs=2",
        # Everything that draws from the global RNGs: dropout, drop-path (torch) and Mixup/CutMix (numpy).
        "model.drop_rate=0.2", "model.drop_path_rate=0.1", "aug.mixup.mixup_alpha=0.8", "aug.mixup.cutmix_alpha=1.0",
        "ema.decay=0.9", "callbacks.checkpoint.every_n_train_steps=1",
        # Rows on odd steps: a stop after batch 5 (step 6) must first log that batch's row (step 5).
        "trainer.log_every_n_steps=2", "export=false", *overrides)
    return train(cfg, callbacks=callbacks)


def logged(run_dir: Path, key: str) -> list[tuple[int, str]]:
    """(step, value) of every row of the run's CSV log that holds `key`."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r[key]) for r in csv.DictReader(f) if r.get(key)]


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_shards) -> tuple[Path, dict[str, float]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, run(synthetic_shards, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("preemption, checkpointed_step", [(lambda: PreemptAt(5), 4),
                                                          (PreemptBeforeValidation, STEPS_PER_EPOCH - 1)],
                         ids=["mid_epoch", "after_the_last_batch_of_an_epoch"])
def test_a_run_killed_and_resumed_reproduces_the_uninterrupted_runs_weights_with_dropout_drop_path_and_mixup(
        tmp_path, synthetic_shards, uninterrupted, preemption, checkpointed_step):
    a_dir, a_metrics = uninterrupted
    # Killed (checkpointed every step: the step before the kill is on disk; not after an epoch's last batch, whose
    # validation has not run: see StepCheckpoint), then restarted with ckpt_path=last in the same run dir.
    with pytest.raises(Preemption):
        run(synthetic_shards, tmp_path, callbacks=[preemption()])
    assert last(tmp_path)["global_step"] == checkpointed_step
    assert len(last(tmp_path)["rng_states"]) == 1  # one rank
    resumed = run(synthetic_shards, tmp_path, "ckpt_path=last")

    a, b = last(a_dir), last(tmp_path)
    # last.ckpt is the final state in both, also when the last validation did not improve on the best
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    for part in ("state_dict", "current_model_state"):  # EMA and trained weights
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert resumed["val/acc1"] == a_metrics["val/acc1"]
    # The restart appended to the CSV log in the same run dir: every step's loss once, the same as uninterrupted.
    for key in ("train/loss", "train/acc1_epoch", "val/acc1", "lr-AdamW/pg1"):
        assert logged(tmp_path, key) == logged(a_dir, key), key


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["slurm_usr1", "submitit_usr2"])
def test_a_signal_checkpoints_at_the_next_step_and_the_default_ckpt_path_resumes_to_the_uninterrupted_run(
        tmp_path, synthetic_shards, uninterrupted, signum, caplog):
    a_dir, a_metrics = uninterrupted
    with pytest.raises(Requeued, match=f"stopped on {signal.Signals(signum).name} at step 6"):
        run(synthetic_shards, tmp_path, callbacks=[SignalAt(5, signum)])  # handled at the end of the next step
    assert last(tmp_path)["global_step"] == 6
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is removed with the run
    with caplog.at_level("INFO", logger="train.cluster.requeue"):
        resumed = run(synthetic_shards, tmp_path)  # ckpt_path=auto (the default) finds last.ckpt
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.ckpt'} at step 6 (epoch 0)" in caplog.text
    a, b = last(a_dir), last(tmp_path)
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert resumed["val/acc1"] == a_metrics["val/acc1"]
    assert logged(tmp_path, "train/loss") == logged(a_dir, "train/loss")


@pytest.mark.slow
def test_a_signal_in_an_epochs_last_batch_stops_after_its_validation_and_the_resumed_log_keeps_every_row_once(
        tmp_path, synthetic_shards, uninterrupted):
    a_dir, _ = uninterrupted
    # Seen at the end of the epoch's last batch (step 12): the stop waits for the validation that follows; the resumed
    # run then ends the epoch (its epoch-end row) and goes on. The CSV must keep the interrupted segment's last train
    # row and validation row, and hold the epoch-end row once (a CI run once lost the first two).
    with pytest.raises(Requeued, match=f"at step {STEPS_PER_EPOCH};"):
        run(synthetic_shards, tmp_path, callbacks=[SignalAt(STEPS_PER_EPOCH - 1, signal.SIGUSR1)])
    run(synthetic_shards, tmp_path)
    for key in ("train/loss", "val/acc1", "train/acc1_epoch", "data/bad_samples", "epoch", "images_seen"):
        assert logged(tmp_path, key) == logged(a_dir, key), key


@pytest.mark.slow
def test_a_signalled_run_closes_its_wandb_segment_and_the_restart_continues_the_same_run_id(tmp_path,
                                                                                              synthetic_shards):
    wandb_on = ("logger.wandb.enabled=true", "logger.wandb.mode=offline", "trainer.max_epochs=1")
    with pytest.raises(Requeued):
        run(synthetic_shards, tmp_path, *wandb_on, "trainer.log_every_n_steps=1",
            callbacks=[SignalAt(3, signal.SIGUSR1)])
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    first = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    # The segment was finished before the stop: its steps are on disk (a W&B service killed by the requeue's
    # SIGTERM leaves a 7-byte header, as seen with wandb 0.31 offline under Slurm 22.05).
    assert len(first) == 1 and first[0].stat().st_size > 10_000, first
    time.sleep(1.1)  # offline folders are named by the second they start in: keep the two segments apart
    run(synthetic_shards, tmp_path, *wandb_on)
    # Offline W&B writes one folder per start; both carry the run dir's id (`wandb sync` uploads them as one run).
    segments = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{run_id}") for s in segments), segments


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_stops_without_a_requeue_and_auto_resumes_by_hand(
        tmp_path, synthetic_shards, uninterrupted):
    a_dir, a_metrics = uninterrupted
    with pytest.raises(Stopped, match="stopped on SIGTERM at step 6.*not requeued") as stopped:
        run(synthetic_shards, tmp_path, callbacks=[SignalAt(5, signal.SIGTERM)])  # what `scancel JOB` sends
    assert not isinstance(stopped.value, Requeued) and stopped.value.signum == signal.SIGTERM
    assert last(tmp_path)["global_step"] == 6
    resumed = run(synthetic_shards, tmp_path)
    a, b = last(a_dir), last(tmp_path)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert resumed["val/acc1"] == a_metrics["val/acc1"]
    assert logged(tmp_path, "train/loss") == logged(a_dir, "train/loss")


@pytest.mark.slow
def test_a_requeue_signal_a_launcher_handled_before_the_run_goes_back_to_that_handler_after_the_checkpoint(
        tmp_path, synthetic_shards):
    # submitit installs its USR2 handler before it calls the training function (it requeues and resubmits the
    # pickled job itself); the run checkpoints first, then hands the signal over.
    calls = []

    def launchers_handler(signum, frame):
        calls.append((signum, (tmp_path / "checkpoints" / "last.ckpt").is_file()))

    previous = signal.signal(signal.SIGUSR2, launchers_handler)
    try:
        with pytest.raises(Requeued, match="stopped on SIGUSR2 at step 3"):
            run(synthetic_shards, tmp_path, "trainer.max_epochs=1", callbacks=[SignalAt(2, signal.SIGUSR2)])
        assert calls == [(signal.SIGUSR2, True)]  # once, after last.ckpt was written
        assert signal.getsignal(signal.SIGUSR2) is launchers_handler  # the launcher's handler is back
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.fixture
def launcher():
    """A launcher's own handler of the requeue signal, installed before the run (as submitit installs its USR2)."""
    calls: list[int] = []

    def launchers_handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR1, launchers_handler)
    yield calls
    signal.signal(signal.SIGUSR1, previous)


def signal_inside(monkeypatch, name: str) -> None:
    """`train.run.<name>` sends this process SIGUSR1 as it begins (the handler runs inside it)."""
    real = getattr(run_module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, name, signalled)


def test_a_requeue_signal_during_start_up_requeues_the_job_at_once_with_nothing_written(
        tmp_path, synthetic_shards, launcher, monkeypatch):
    signal_inside(monkeypatch, "preflight")  # start-up: reading the data, the teacher, the checkpoint
    with pytest.raises(Requeued, match="SIGUSR1 during start-up: requeued"):
        run(synthetic_shards, tmp_path)
    assert launcher == [signal.SIGUSR1]  # the launcher's handler requeued the job
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()
    assert signal.getsignal(signal.SIGUSR1).__name__ == "launchers_handler"  # handlers back as they were


@pytest.mark.slow
def test_a_requeue_signal_during_the_export_requeues_and_the_resumed_job_exports(tmp_path, synthetic_shards, launcher,
                                                                                monkeypatch):
    signal_inside(monkeypatch, "export_model")
    with pytest.raises(Requeued, match="SIGUSR1 during the export: requeued"):
        run(synthetic_shards, tmp_path, "trainer.max_epochs=1", "export=true", "export_latency=false")
    assert launcher == [signal.SIGUSR1]
    assert last(tmp_path)["global_step"] == STEPS_PER_EPOCH and not (tmp_path / "export" / "metrics.json").exists()
    monkeypatch.undo()  # the requeued job starts again: training is done, so it exports
    metrics = run(synthetic_shards, tmp_path, "trainer.max_epochs=1", "export=true", "export_latency=false")
    assert (tmp_path / "export" / "metrics.json").is_file() and metrics["export/top1"] >= 0


def test_a_run_outlives_the_wandb_service_that_a_jobs_sigterm_stopped(tmp_path, monkeypatch, caplog):
    # Slurm's SIGTERM reaches W&B's service process too; it exits, and the run's next W&B call fails. The run must
    # still reach its next safe step, checkpoint and stop (the CSV log keeps the rows).
    calls = []

    def service_gone(self, metrics, step=None):
        calls.append(metrics)
        raise ConnectionResetError("Connection lost")

    monkeypatch.setattr(WandbLogger, "log_metrics", service_gone)
    logger = ServiceSafeWandbLogger(project="p", mode="offline", save_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="train.tracking.loggers"):
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_metrics({"train/loss": 0.9}, step=2)  # dropped: the service is known to be gone
        close_loggers([logger], success=True, preempted=True)
    assert calls == [{"train/loss": 1.0}] and logger.lost
    assert caplog.text.count("W&B: its service process is gone") == 1
