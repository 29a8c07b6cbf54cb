"""A new user's first hour: every wrong input gets one clear answer before any work, all of them at once, with exit
status 2, no traceback and nothing written; failed runs say so; a finished run is left alone; the console is lines a
person reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_run

from data_pipes.errors import Problems
from data_pipes.shards.metadata import read_info
from distill.reader import adopt_recorded
from train.cluster.resume import ResumeError, check_weights_fit
from train.compare.runs import load_run
from train.compare.table import markdown
from train.nets.load import LoadError, read_checkpoint
from train.run import train
from train.tracking.console import KNOWN_LOG_LINES, KNOWN_WARNINGS

REPO = Path(__file__).resolve().parents[1]


def command(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "MOBILENET_"))}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "WANDB_MODE": "offline"})


def refused(done: subprocess.CompletedProcess, *expected: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    return out


def test_the_headline_command_names_every_missing_input_in_one_start_and_leaves_no_run_directory(tmp_path):
    done = command("-m", "train", "model=mnv4_hybrid_l", "distill=true", f"hydra.run.dir={tmp_path}/runs/x")
    out = refused(done, "2 problems before the run could start", "data.root is not set", "needs a teacher")
    assert "1." in out and "2." in out
    assert not (tmp_path / "runs").exists()  # Hydra made it; the refused start took it away again


def test_bad_values_an_unknown_trainer_key_and_a_missing_last_checkpoint_come_together_with_their_fixes(
        tmp_path, synthetic_shards):
    done = command("-m", "train", f"data.root={synthetic_shards}", f"hydra.run.dir={tmp_path}/run", "ckpt_path=last",
                   "data.batch_size=0", "data.num_workers=-1", "data.img_size=0", "+trainer.max_epoch=1",
                   "ema.decay=1.5")
    out = refused(done, "data.batch_size=0: must be an int >= 1", "data.num_workers=-1: must be an int >= 0",
                  "data.img_size=0: must be null", "trainer.max_epoch is not an argument of lightning.Trainer: did "
                  "you mean trainer.max_epochs", "ema.decay=1.5", "ckpt_path=last resumes", "does not exist")
    assert "6 problems before the run could start" in out, out
    assert not (tmp_path / "run").exists()


def test_a_mistyped_key_names_the_close_valid_key_instead_of_suggesting_a_plus(tmp_path):
    done = command("-m", "train", "trainer.max_epoch=1", f"hydra.run.dir={tmp_path}/run")
    out = refused(done, "trainer.max_epoch is not a config key: did you mean trainer.max_epochs")
    assert "+trainer" not in out and not (tmp_path / "run").exists()


def test_a_folder_of_photos_as_data_root_gets_the_command_that_shards_it(synthetic_folder):
    with pytest.raises(Exception, match=r"is a folder of images, not shards: make shards from it once with "
                                        r"`python -m data_pipes.shards.make --src"):
        read_info(synthetic_folder)


def test_the_data_root_is_recorded_absolute_so_exports_work_from_any_directory(synthetic_shards, monkeypatch):
    monkeypatch.chdir(synthetic_shards.parent)
    info = read_info(synthetic_shards.name)
    assert info.root.is_absolute() and info.root == synthetic_shards.resolve()


def test_a_batch_larger_than_the_split_is_refused_with_the_size_that_fits(tmp_path, synthetic_shards):
    with pytest.raises(Problems, match=r"data.batch_size=5000 on 1 process needs at least 5000 train images, .* "
                                       r"has 200: .* use data.batch_size=200 or less"):
        train(compose_run(f"run_dir={tmp_path / 'run'}", f"data.root={synthetic_shards}", "data.batch_size=5000"))
    assert not (tmp_path / "run").exists()


def test_a_damaged_last_checkpoint_is_refused_naming_the_file_and_the_checkpoints_to_resume_from(
        tmp_path, trained_teacher, synthetic_shards):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_teacher.parent, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # a disk that filled up, a copy cut short
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(Problems, match=rf"checkpoint {last} cannot be read .* ckpt_path={run_dir}/checkpoints/"
                                       rf"best.ckpt.* ckpt_path=null hydra.run.dir="):
        train(compose_run(f"run_dir={run_dir}", f"data.root={synthetic_shards}", "model=mnv3_s_075",
                          "trainer.max_epochs=2"))
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_weights_of_another_shape_are_refused_in_one_line_before_lightning_prints_every_key(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self, width: int, extra: str) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(width))
            self.register_parameter(extra, torch.nn.Parameter(torch.zeros(1)))
            self.register_buffer("scale", torch.zeros(width))  # an observer's: sized when it loads

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": Net(3, "gone").state_dict()}, ckpt)
    with pytest.raises(ResumeError, match=r"1 missing \(first: b\); 1 unexpected \(first: gone\); 1 of other shapes "
                                          r"\(first: a\)"):
        check_weights_fit(str(ckpt), tmp_path, Net(4, "b"))
    fits = Net(3, "gone")
    fits.scale = torch.zeros(7)
    check_weights_fit(str(ckpt), tmp_path, fits)


def test_exporting_an_export_or_a_run_directory_names_the_checkpoint_to_export(trained_teacher):
    with pytest.raises(LoadError, match="is an export directory, not a checkpoint.*python -m train.export .*last.ckpt"):
        read_checkpoint(trained_teacher)
    with pytest.raises(LoadError, match="is a run directory, not a checkpoint.*checkpoints/last.ckpt"):
        read_checkpoint(trained_teacher.parent)


def test_a_run_that_fails_is_marked_failed_with_its_error_and_compare_shows_it(tmp_path, synthetic_shards):
    class FailAtStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("out of memory on the device (simulated)")

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        train(compose_run(f"run_dir={run_dir}", f"data.root={synthetic_shards}", "data.batch_size=25",
                          "trainer.max_epochs=1"), callbacks=[FailAtStep()])
    record = json.loads((run_dir / "summary.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("RuntimeError: out of memory")
    run = load_run(run_dir)
    assert run.state.startswith("failed: RuntimeError") and "failed: RuntimeError" in markdown([run])


def test_resuming_a_finished_run_says_it_is_finished_and_leaves_its_export_alone(tmp_path, trained_teacher,
                                                                                  synthetic_shards, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_teacher.parent, run_dir)
    export = {p.name: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()}
    caplog.set_level("INFO")
    metrics = train(compose_run(f"run_dir={run_dir}", f"data.root={synthetic_shards}", "model=mnv3_s_075",
                                "data.batch_size=25", "trainer.max_epochs=1", "data.num_workers=2"))
    assert "is finished (1 epochs" in caplog.text and "nothing to train" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()} == export
    assert metrics["val/acc1_final"] >= 0
    (run_dir / "export" / "metrics.json").unlink()  # a missing export is made again
    train(compose_run(f"run_dir={run_dir}", f"data.root={synthetic_shards}", "model=mnv3_s_075",
                      "data.batch_size=25", "trainer.max_epochs=1", "data.num_workers=2", "export_latency=false"))
    assert (run_dir / "export" / "metrics.json").is_file()


def test_training_on_built_sets_takes_their_recorded_settings_and_refuses_only_a_conflicting_override(tmp_path):
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "manifest.json").write_text(json.dumps({
        "storage": "params", "top_k": 4, "seed": 0, "view_size": 64, "label_names": list("abcd"),
        "sources": {"d1": {"replicas": 4}, "d3": {"replicas": 2, "selection": {"selector": "teacher",
                                                                             "threshold": 0.5, "per_class": 9}}}}))
    kd = {"sets": str(sets), "storage": "params", "top_k": 10, "seed": 0, "view_size": None,
          "sources": {"d1": {"replicas": 1000}, "d3": {"replicas": 10, "selector": None, "threshold": 0.3,
                                                        "per_class": 130000}}}
    adopted, taken, conflicts = adopt_recorded(kd, explicit=set())
    assert taken == {"kd.view_size": 64, "kd.sources.d1.replicas": 4, "kd.sources.d3.replicas": 2,
                     "kd.sources.d3.threshold": 0.5, "kd.sources.d3.per_class": 9}  # top_k 10 > 4 classes: stored 4
    assert adopted["sources"]["d1"]["replicas"] == 4 and conflicts == [] and kd["sources"]["d1"]["replicas"] == 1000
    _, taken, conflicts = adopt_recorded(kd, explicit={"kd.sources.d1.replicas"})
    assert "kd.sources.d1.replicas" not in taken
    assert conflicts == [f"kd.sets={sets} was built with kd.sources.d1.replicas=4, and this command sets "
                         f"kd.sources.d1.replicas=1000: drop the override to train on these sets, or build new ones "
                         f"with it (python -m distill.build ... kd.sources.d1.replicas=1000 kd.sets=<a new "
                         f"directory>)"]


@pytest.mark.slow
def test_a_two_epoch_run_prints_one_clean_line_per_event_and_nothing_twice(tmp_path, synthetic_shards):
    done = command("-m", "train", f"data.root={synthetic_shards}", f"hydra.run.dir={tmp_path}/run",
                   "trainer.max_epochs=2", "data.batch_size=25", "data.num_workers=2", "trainer.accelerator=cpu",
                   "trainer.devices=1", "trainer.log_every_n_steps=4", "export_latency=false", "data.img_size=64")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("mnv3_s_100 (mobilenetv3_small_100, ") and "a fresh start" in lines[0], out
    assert lines[-1].startswith("done: 2 epochs") and "W&B offline: wandb sync" in lines[-1], out
    assert sum(" val: acc1 " in line for line in lines) == 2
    assert len(lines) == len(set(lines)), out  # nothing twice
    noise = [p for p, _ in KNOWN_LOG_LINES + KNOWN_WARNINGS] + [r"Warning", r"wandb: ", r"\| Name ", r"Traceback"]
    assert not [line for line in lines for p in noise if re.search(p, line)], out
    assert len(lines) <= 20, out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "done: 2 epochs" in log and (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_a_group_option_that_does_not_exist_and_a_required_value_get_the_close_choices_before_hydra(tmp_path):
    refused(command("-m", "train", "experiment=mnv4_conv_s", f"hydra.run.dir={tmp_path}/run"),
            "experiment=mnv4_conv_s is not a choice of conf/experiment/: did you mean experiment=mnv4_conv_s_paper")
    refused(command("-m", "train", "model=timm"), "model.name is required and not set", "e.g. model.name=")
    assert not (tmp_path / "run").exists()


def test_settings_that_do_not_go_together_or_do_not_fit_this_machine_are_named_with_their_fixes(
        tmp_path, synthetic_shards, trained_teacher):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.root={synthetic_shards}", "distill=yes",
                 f"init_from={trained_teacher}", "trainer.devices=0", f"kd.teacher={trained_teacher}",
                 "kd.extra_root=/nowhere/extra-wds"]
    if not torch.cuda.is_available():
        overrides += ["trainer.accelerator=gpu"]
    with pytest.raises(Problems) as caught:
        train(compose_run(*overrides))
    found = "\n".join(caught.value.found)
    for expected in ("distill='yes': must be true or false", "init_from=", "is read by qat=true only",
                     "trainer.devices=0: must be auto, a count >= 1",
                     "kd.extra_root=/nowhere/extra-wds does not exist"):
        assert expected in found, found
    if not torch.cuda.is_available():
        assert "trainer.accelerator=gpu, but torch sees no CUDA GPU" in found, found
    with pytest.raises(Problems, match="trainer.precision=16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true"):
        train(compose_run(f"run_dir={tmp_path / 'run'}", f"data.root={synthetic_shards}", "trainer.accelerator=cpu",
                          "trainer.precision=16-mixed"))
    assert not (tmp_path / "run").exists()


def test_a_build_with_top_k_beyond_the_classes_stores_every_class_and_a_refused_build_writes_nothing(
        tmp_path, synthetic_shards, trained_teacher, caplog):
    from distill.build import build

    common = [f"data.root={synthetic_shards}", f"kd.teacher={trained_teacher}", "kd.sources.d1.replicas=1",
              "kd.sources.d2.weight=0", "kd.build.num_workers=1", "kd.build.batch_size=50", "kd.view_size=32"]
    sets = tmp_path / "sets"
    with pytest.raises(Problems, match="kd.storage='bogus'"):
        build(compose_run(*common, f"kd.sets={sets}", "kd.storage=bogus", "kd.top_k=20"))
    assert not sets.exists()  # no _build.json to refuse the corrected command
    caplog.set_level("INFO")
    build(compose_run(*common, f"kd.sets={sets}", "kd.top_k=20"))
    assert "kd.top_k=20 is more than the data's 10 classes" in caplog.text
    manifest = json.loads((sets / "manifest.json").read_text())
    assert manifest["top_k"] == 10
    block = np.load(sets / "d1" / "block-000000.npy")  # (replicas, members) records
    assert block["ids"].shape[-1] == 10 and (block["probs"].sum(axis=-1) > 0).all()
