"""SLURM jobs on a real single-node cluster (`.ci/slurm.sh up`, which `.ci/run` starts and stops): the project's
sbatch script runs 2-task DDP jobs on CPU (gloo); a job signalled before its "time limit" checkpoints, requeues
itself, resumes in the same run directory and ends where an uninterrupted job ends, its W&B steps and CSV rows each
logged once; `scancel` leaves a checkpoint that a resubmission resumes; distill=true and qat=true jobs survive a
requeue; a sweep through the Hydra SLURM launcher (submitit, which signals USR2) completes and exports."""

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
from wandb_records import history

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


def submit(workdir: Path, *overrides: str, tasks: int = 2) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["sbatch", "--parsable", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--time=15",
                           f"--chdir={workdir}", str(REPO / "slurm" / "train.sbatch"), *overrides],
                          capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shards) -> tuple[Path, str]:
    """A 2-task DDP job of the sbatch script, one epoch, exported: its workdir and job id. Its export is the
    teacher and the init_from of the distill and QAT jobs below."""
    workdir = tmp_path_factory.mktemp("exported")
    job = submit(workdir, f"data.root={shards}", *OVERRIDES[:-2], "trainer.max_epochs=1", "export=true")
    state = wait_done(job)
    assert state["JobState"] == "COMPLETED", (workdir / f"slurm-{job}.out").read_text(errors="replace")[-3000:]
    return workdir, job


@pytest.fixture(scope="module")
def plain(tmp_path_factory, shards) -> Path:
    """The uninterrupted job the signalled and cancelled ones must end equal to: its run directory."""
    workdir = tmp_path_factory.mktemp("plain")
    job = submit(workdir, f"data.root={shards}", *OVERRIDES)
    assert wait_done(job)["JobState"] == "COMPLETED", (workdir / f"slurm-{job}.out").read_text()[-3000:]
    return run_dir(workdir, job)


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


def test_the_sbatch_script_runs_a_two_task_ddp_job_that_exports(exported):
    workdir, job = exported
    log = (workdir / f"slurm-{job}.out").read_text(errors="replace")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "1 node(s) x 2 task(s)" in log
    out = run_dir(workdir, job)
    metrics = json.loads((out / "export" / "metrics.json").read_text())
    assert metrics["val_images"] == 16 and (out / "export" / "model.onnx").is_file()
    assert len(last(out)["rng_states"]) == 2  # both ranks' RNG states


def test_a_job_signalled_twice_requeues_resumes_in_its_run_dir_and_ends_like_an_uninterrupted_one(tmp_path, shards,
                                                                                                  plain):
    job = submit(tmp_path / "requeued", f"data.root={shards}", *OVERRIDES)
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

    a, b = plain, run_dir(tmp_path / "requeued", job)
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
    # W&B: every segment's rows on disk (a requeue's SIGTERM kills W&B's service: a segment not finished before it
    # keeps only its file header, as seen with wandb 0.31), together each logged step once, the same steps and
    # values as the uninterrupted job's single segment.
    per_segment = [wandb_losses(s) for s in sorted(segments)]
    assert all(per_segment), [len(rows) for rows in per_segment]
    assert sum(per_segment, []) == wandb_losses(*(a / "wandb").glob("offline-run-*")) and len(per_segment[0]) > 1


def wandb_losses(segment: Path) -> list[tuple[int, float]]:
    """(trainer/global_step, train/loss) of every W&B history row of one offline segment that logged a loss."""
    (log,) = segment.glob("run-*.wandb")
    return [(int(row["trainer/global_step"]), row["train/loss"]) for row in history(log) if "train/loss" in row]


def test_scancel_checkpoints_and_stops_and_a_resubmission_into_the_run_dir_resumes_to_the_uninterrupted_end(
        tmp_path, shards, plain):
    job = submit(tmp_path, f"data.root={shards}", *OVERRIDES)
    log = tmp_path / f"slurm-{job}.out"
    wait_for(log, "step 4/")
    subprocess.run(["scancel", job], check=True)  # SIGTERM to every process of the job, SIGKILL KillWait (5 s) later
    state = wait_done(job)
    text = log.read_text(errors="replace")
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", (state, text[-3000:])
    assert "stopped on SIGTERM" in text and "not requeued" in text, text[-3000:]
    out = run_dir(tmp_path, job)
    stopped_at = last(out)["global_step"]
    assert 4 <= stopped_at < 8 * 10

    # By hand: the same overrides, into the same run directory; ckpt_path=auto (the default) finds last.ckpt.
    again = submit(tmp_path, f"data.root={shards}", *OVERRIDES, f"hydra.run.dir={out}")
    state = wait_done(again)
    text = (tmp_path / f"slurm-{again}.out").read_text(errors="replace")
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'last.ckpt'} at step {stopped_at}" in text
    a, b = last(plain), last(out)
    assert a["global_step"] == b["global_step"] == 8 * 10
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_a_distill_job_and_a_qat_job_each_requeue_on_the_signal_and_resume_to_their_last_step(tmp_path, shards,
                                                                                            exported):
    teacher = run_dir(*exported) / "export"
    common = [f"data.root={shards}", *OVERRIDES[:-2], "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]
    jobs = {  # one task each (the two run side by side on the 2-CPU node): 20 steps an epoch
        "distill": submit(tmp_path / "distill", *common, "distill=true", f"kd.teacher={teacher}", tasks=1),
        "qat": submit(tmp_path / "qat", *common, "qat=true", f"init_from={teacher}", "quant.freeze_bn_epoch=1",
                      "quant.freeze_observer_epoch=1", tasks=1),
    }
    for name, job in jobs.items():
        wait_for(tmp_path / name / f"slurm-{job}.out", "step 5/")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
    for name, job in jobs.items():
        state = wait_done(job)
        text = (tmp_path / name / f"slurm-{job}.out").read_text(errors="replace")
        assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (name, state, text[-3000:])
        out = run_dir(tmp_path / name, job)
        assert text.count("resumed from") == 1 and str(out) in text, (name, text[-3000:])
        ckpt = last(out)
        assert ckpt["global_step"] == 2 * 20 and ckpt["run_config"][name], name
        assert all(k.startswith(("model.", "val_acc")) for k in ckpt["state_dict"])  # the student's only
    qat = last(run_dir(tmp_path / "qat", jobs["qat"]))["state_dict"]
    assert qat["model.frozen_bn"] and qat["model.frozen_observers"]


def test_a_sweep_through_the_hydra_slurm_launcher_survives_submitits_usr2_and_both_runs_export(tmp_path, shards):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm", "model=mnv3_s_075,mnv2_035",
               f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
               f"data.root={shards}", *OVERRIDES[1:-2], "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
               "export=true", "export_tflite=false"]
    sweeper = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        # submitit's own signal (USR2), by hand, to the first task once it trains; its log is submitit's.
        deadline = time.monotonic() + 300
        while not (logs := sorted(sweep.glob(".submitit/*_0/*_0_log.out"))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert logs, f"no submitit log under {sweep}"
        wait_for(logs[0], "step 5/")
        task = logs[0].parent.name  # <array job id>_0
        subprocess.run(["scancel", "--signal=USR2", task], check=True)
        output, _ = sweeper.communicate(timeout=400)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 0, output[-3000:]
    text = logs[0].read_text(errors="replace")
    # Our checkpoint first, then submitit's own handler requeues the task (and exits it: no "stopped on" line).
    assert "SIGUSR2: checkpoint" in text and "handing SIGUSR2 to the launcher's handler" in text, text[-3000:]
    assert text.index("SIGUSR2: checkpoint") < text.index("Requeued job"), text[-3000:]
    assert job_state(task).get("Restarts") == "1"
    assert f"resumed from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in logs[0].read_text(errors="replace")
    for num, architecture in enumerate(("mobilenetv3_small_075", "mobilenetv2_035")):
        metrics = json.loads((sweep / str(num) / "export" / "metrics.json").read_text())
        assert metrics["architecture"] == architecture and metrics["val_images"] == 16, metrics
        assert last(sweep / str(num))["global_step"] == 2 * 20


@pytest.mark.parametrize("tasks, cpus", [(1, 2), (2, 1)])
def test_each_task_of_the_sbatch_script_may_use_the_cpus_per_task_the_job_asked_for(tmp_path, tasks, cpus):
    # The cluster binds tasks to CPUs (TaskPlugin=task/affinity, as production clusters do). PYTHON stands in for
    # the interpreter: each task prints how many CPUs it may run on, where its loader workers would run.
    interpreter = tmp_path / "affinity"
    interpreter.write_text("#!/bin/bash\n"  # the CPUs the task may run on (not nproc: it reads OMP_NUM_THREADS)
                           f"echo \"TASK $SLURM_PROCID CPUS $({sys.executable} -c "
                           "'import os; print(len(os.sched_getaffinity(0)))')\"\n")
    interpreter.chmod(0o755)
    env = {**os.environ, "PYTHON": str(interpreter)}
    done = subprocess.run(["sbatch", "--parsable", f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}",
                           "--time=2", f"--chdir={tmp_path}", str(REPO / "slurm" / "train.sbatch"), "model=mnv3_s_075"],
                          capture_output=True, text=True, env=env, check=True)
    job = done.stdout.strip().split(";")[0]
    assert wait_done(job, timeout=120)["JobState"] == "COMPLETED"
    lines = sorted(line for line in (tmp_path / f"slurm-{job}.out").read_text().splitlines()
                   if line.startswith("TASK"))
    assert lines == [f"TASK {t} CPUS {cpus}" for t in range(tasks)]


@pytest.fixture(scope="module")
def one_bad_shard(tmp_path_factory) -> Path:
    """Shards of 4 x 40 training images in 4 shards, one of them not a tar: the rank that reads it fails."""
    from data_pipes.shards.make import make_shards
    from data_pipes.shards.synthetic import make_image_folder

    tmp = tmp_path_factory.mktemp("bad-shard")
    images = make_image_folder(tmp / "images", num_classes=4, train_per_class=40, val_per_class=4, size=40)
    make_shards(images, tmp / "shards", samples_per_shard=40, workers=1, progress=False)
    (tmp / "shards" / "train-000002.tar").write_bytes(b"not a tar" * 100)
    return tmp / "shards"


@pytest.mark.parametrize("launch", ["sbatch_script", "sweep_launcher"])
def test_a_bad_shard_on_one_rank_stops_every_rank_promptly_with_the_error(tmp_path, one_bad_shard, launch):
    # The other rank would otherwise wait in its next collective for gloo's (NCCL's) 30-minute timeout.
    overrides = [f"data.root={one_bad_shard}", *OVERRIDES[:-2], "data.shuffle_window=40", "logger.wandb.enabled=false"]
    start = time.monotonic()
    if launch == "sbatch_script":
        state = wait_done(submit(tmp_path, *overrides), timeout=240)
        logs = list(tmp_path.glob("slurm-*.out"))
        assert state["JobState"] == "FAILED", state
    else:  # submitit's own srun, through the Hydra SLURM launcher; the sweep's job is what must end
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
        sweeper = subprocess.Popen([sys.executable, "-m", "train", "-m", "hydra/launcher=slurm",
                                    f"hydra.sweep.dir={tmp_path}", "hydra.launcher.timeout_min=10",
                                    "hydra.launcher.cpus_per_task=1", "hydra.launcher.tasks_per_node=2", *overrides],
                                   cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (jobs := sorted(p for p in tmp_path.glob(".submitit/*") if p.is_dir())) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            assert jobs, f"no submitit job under {tmp_path}"
            state = wait_done(jobs[0].name, timeout=240)
        finally:
            sweeper.kill()  # without Slurm accounting (this cluster) submitit cannot read a failed job's state
        logs = list(tmp_path.glob(".submitit/*/*_log.*"))
        assert state["JobState"] == "FAILED", state
        # On gloo a peer's closed socket already ends the others; NCCL ranks would wait for their timeout, so the
        # step must end on the first failed task: submitit's srun is told so (and the CPUs per task) by the setup.
        script = next(jobs[0].glob("*_submission.sh")).read_text()
        assert "export SLURM_KILL_BAD_EXIT=1" in script and "export SRUN_CPUS_PER_TASK=" in script, script
    assert time.monotonic() - start < 200
    text = "".join(log.read_text(errors="replace") for log in logs)
    assert "cannot read shard" in text and "train-000002.tar" in text, text[-3000:]
