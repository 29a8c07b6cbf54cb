"""SLURM jobs on a real single-node cluster (`.ci/slurm.sh up`, which `.ci/run` starts and stops): the project's
sbatch script runs 2-task DDP jobs on CPU (gloo); a job signalled before its "time limit" checkpoints, requeues
itself, resumes in the same run directory and ends where an uninterrupted job ends."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return done.returncode == 0 and "idle" in done.stdout


if not _cluster_up():
    pytest.skip("needs a running Slurm cluster: `bash .ci/slurm.sh up` (as root; .ci/run does it)",
                allow_module_level=True)

OVERRIDES = ["model=mnv3_s_075", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
             "trainer.accelerator=cpu", "trainer.max_epochs=8", "trainer.log_every_n_steps=2",
             "callbacks.checkpoint.every_n_train_steps=1000", "export=false", "logger.wandb.mode=offline",
             "model.drop_rate=0.2", "model.drop_path_rate=0.1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 classes x 40 train images: 10 steps an epoch on each of 2 ranks at batch 8."""
    from data_pipes.shards.make import make_shards
    from data_pipes.shards.synthetic import make_image_folder

    tmp = tmp_path_factory.mktemp("slurm-data")
    images = make_image_folder(tmp / "images", num_classes=4, train_per_class=40, val_per_class=4, size=40)
    make_shards(images, tmp / "shards", samples_per_shard=64, workers=1, progress=False)
    return tmp / "shards"


def submit(workdir: Path, *overrides: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15",
                           f"--chdir={workdir}", str(REPO / "slurm" / "train.sbatch"), *overrides],
                          capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_done(job: str, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_state(job)}")


def wait_for(log: Path, text: str, after: int = 0, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace")[after:]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {log}: {log.read_text(errors='replace')[-3000:]}")


def run_dir(workdir: Path, job: str) -> Path:
    (found,) = (workdir / "runs" / "mnv3_s_075").glob(f"slurm-{job}-*")
    return found


def last(path: Path) -> dict:
    return torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_the_sbatch_script_runs_a_two_task_ddp_job_that_exports(tmp_path, shards):
    job = submit(tmp_path, f"data.root={shards}", *OVERRIDES[:-2], "trainer.max_epochs=1", "export=true")
    state = wait_done(job)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "1 node(s) x 2 task(s)" in log
    out = run_dir(tmp_path, job)
    metrics = json.loads((out / "export" / "metrics.json").read_text())
    assert metrics["val_images"] == 16 and (out / "export" / "model.onnx").is_file()
    assert len(last(out)["rng_states"]) == 2  # both ranks' RNG states


def test_a_job_signalled_twice_requeues_resumes_in_its_run_dir_and_ends_like_an_uninterrupted_one(tmp_path, shards):
    common = [f"data.root={shards}", *OVERRIDES]
    plain = submit(tmp_path / "plain", *common)
    assert wait_done(plain)["JobState"] == "COMPLETED"

    job = submit(tmp_path / "requeued", *common)
    log = tmp_path / "requeued" / f"slurm-{job}.out"
    timeline = [("submitted", time.monotonic())]
    wait_for(log, "step 4/")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what Slurm sends ahead of the time limit
    timeline.append(("first USR1", time.monotonic()))
    wait_for(log, "resumed from")
    timeline.append(("resumed", time.monotonic()))
    seen = len(log.read_text(errors="replace"))
    wait_for(log, " | loss ", after=seen)  # training again after the restart
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    timeline.append(("second USR1", time.monotonic()))
    state = wait_done(job)
    timeline.append(("completed", time.monotonic()))
    text = log.read_text(errors="replace")
    print("timeline:", ", ".join(f"{name} {t - timeline[0][1]:.1f} s" for name, t in timeline))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, text[-3000:])
    assert text.count("stopped on SIGUSR1") >= 2 and text.count("requeued Slurm job") == 2
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) == 2 and all(str(run_dir(tmp_path / "requeued", job)) in line for line in resumed)

    a, b = run_dir(tmp_path / "plain", plain), run_dir(tmp_path / "requeued", job)
    ca, cb = last(a), last(b)
    assert ca["global_step"] == cb["global_step"] == 8 * 10
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key
    # One CSV log, appended to by every start, each step once; one W&B run id for the three segments.
    def losses(path: Path) -> list[tuple[str, str]]:
        with open(path / "csv" / "metrics.csv", newline="") as f:
            return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert losses(b) == losses(a) and len(losses(a)) == 40
    run_id = (b / "wandb_run_id").read_text().strip()
    segments = list((b / "wandb").glob("offline-run-*"))
    assert len(segments) == 3 and all(s.name.endswith(f"-{run_id}") for s in segments), segments
