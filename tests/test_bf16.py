"""The main paths under `trainer.precision=bf16-mixed` (what `auto` picks on every GPU that has bf16), run on the CPU's
bf16 autocast: labels only with EMA and Mixup, online and offline MNv4 distillation and logit KD train, log, and
resume mid-epoch to the uninterrupted run's weights."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_run
from preemption import PreemptAt, Preemption

from distill.build import build as build_sets
from distill.teacher import load_teacher
from train.run import train

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
              pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")]

BF16 = ("trainer.precision=bf16-mixed", "data.batch_size=20", "data.num_workers=2", "trainer.max_epochs=2",
        "callbacks.checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1", "export=false")
LABELS = ("ema.decay=0.9", "aug.mixup.mixup_alpha=0.8", "aug.mixup.cutmix_alpha=1.0", "model.drop_path_rate=0.1")


def kd(teacher: Path, sets: Path | None = None) -> tuple[str, ...]:
    return ("distill=true", f"kd.teacher={teacher}", f"kd.sets={sets or 'null'}", "kd.sources.d1.replicas=2",
            "kd.sources.d2.replicas=2", "kd.view_size=48", "kd.build.num_workers=1", "kd.build.batch_size=40")


def run(root: Path, run_dir: Path, *overrides: str, callbacks=()) -> dict[str, float]:
    return train(compose_run(f"run_dir={run_dir}", f"data.root={root}", *BF16, *overrides), callbacks=callbacks)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {**ckpt["state_dict"], **{f"current.{k}": v for k, v in (ckpt.get("current_model_state") or {}).items()}}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, synthetic_shards, trained_teacher) -> Path:
    out = tmp_path_factory.mktemp("bf16-sets") / "sets"
    return build_sets(compose_run(f"data.root={synthetic_shards}", *BF16, *kd(trained_teacher, out)))


@pytest.mark.parametrize("mode", ["labels_ema_mixup", "online_kd"])
def test_a_bf16_run_trains_logs_and_resumes_mid_epoch_to_the_uninterrupted_runs_weights(
        tmp_path, synthetic_shards, trained_teacher, mode):
    extra = LABELS if mode == "labels_ema_mixup" else kd(trained_teacher)
    metrics = run(synthetic_shards, tmp_path / "a", *extra)
    assert metrics["val/acc1"] >= 0 and all(math.isfinite(loss) for _, loss in losses(tmp_path / "a"))
    assert len(losses(tmp_path / "a")) == 2 * 10  # a row a step: 200 images, batch 20, two epochs
    with pytest.raises(Preemption):
        run(synthetic_shards, tmp_path / "b", *extra, callbacks=[PreemptAt(13)])
    run(synthetic_shards, tmp_path / "b", *extra)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k],
                                                                                                              b[k])]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


@pytest.mark.parametrize("mode", ["offline_kd", "logit_kd"])
def test_bf16_distillation_from_built_sets_and_logit_kd_train_and_log(tmp_path, synthetic_shards, trained_teacher,
                                                                       sets, mode):
    extra = kd(trained_teacher, sets) if mode == "offline_kd" else (*kd(trained_teacher), "kd=logit")
    metrics = run(synthetic_shards, tmp_path, *extra, "trainer.max_epochs=1")
    assert metrics["val/teacher_agree"] >= 0 and metrics["val/teacher_acc1"] >= 0
    logged = losses(tmp_path)
    assert len(logged) == 10 and all(math.isfinite(loss) for _, loss in logged)


def test_the_teachers_distribution_is_computed_in_fp32_from_its_logits_under_bf16_autocast(trained_teacher):
    teacher = load_teacher(str(trained_teacher))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher.logits(images)
        probs = teacher.probabilities(images, temperature=2.0)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float() / 2.0, dim=1), rtol=0, atol=1e-7)
