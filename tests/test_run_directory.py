"""One run directory per launch: every process of a launch and every restart of it find the same one, two launches
never share one, and a start in a directory that holds a run either continues that very run or is refused before
it writes anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_run

from data_pipes.errors import Problems, UserError
from data_pipes.launch import run_name, this_process, work_share
from data_pipes.shards.make import make_shards
from data_pipes.shards.synthetic import make_image_folder
from train.run import train

REPO = Path(__file__).resolve().parents[1]
# The run directory `python -m train` would use, composed in a fresh process (Hydra resolves it once per process).
RUN_DIR = ("from hydra import compose, initialize_config_dir\n"
           "from omegaconf import OmegaConf\n"
           "from train.nets.configs import CONF_DIR\n"
           "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
           "    cfg = compose(config_name='train', return_hydra_config=True)\n"
           "print(OmegaConf.select(cfg, 'hydra.run.dir'))\n")
TORCHRUN = {"TORCHELASTIC_RUN_ID": "3f2a", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def run_dir_of(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "MOBILENET_"))}
    done = subprocess.run([sys.executable, "-c", RUN_DIR], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=True)
    return done.stdout.strip()


def test_every_process_of_a_launch_and_its_restarts_resolve_one_run_directory_and_two_launches_two():
    rank0 = run_dir_of(**TORCHRUN, RANK="0", LOCAL_RANK="0")
    time.sleep(1.1)  # an elastic restart, a second later: the same directory, so it resumes
    rank1 = run_dir_of(**TORCHRUN, RANK="1", LOCAL_RANK="1")
    assert rank0 == rank1 == "runs/mnv3_s_100/torchrun-3f2a"
    assert run_dir_of(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2") == \
        "runs/mnv3_s_100/slurm-77"
    assert run_dir_of(MOBILENET_RUN_NAME="slurm-77-20261206-101500") == "runs/mnv3_s_100/slurm-77-20261206-101500"
    # Two plain launches started in the same second: two directories.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "MOBILENET_"))}
    procs = [subprocess.Popen([sys.executable, "-c", RUN_DIR], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    first, second = (p.communicate(timeout=120)[0].strip() for p in procs)
    assert first != second and first.startswith("runs/mnv3_s_100/") and second.startswith("runs/mnv3_s_100/")


def test_a_multi_node_torchrun_launch_without_a_rendezvous_id_is_refused_with_the_fix():
    env = {"TORCHELASTIC_RUN_ID": "none", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(UserError, match="--rdzv-id"):
        run_name(env)
    single_node = {**env, "WORLD_SIZE": "8", "RANK": "1"}  # one node: its workers share their agent
    assert run_name(single_node) == run_name(single_node) and run_name(single_node).startswith("torchrun-")


def test_each_process_of_a_launch_knows_its_rank_and_its_share_of_work_before_any_process_group():
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_NODES": "2"}
    process = this_process(srun)
    assert (process.launcher, process.rank, process.world, process.local_rank, process.local_world) == \
        ("srun", 5, 8, 1, 4)
    assert this_process({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).launcher == "none"  # the batch script itself
    array = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_ID": "3"}
    assert work_share({**srun, **array}) == (2 * 8 + 5, 3 * 8)
    assert work_share({**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}) == (1, 2)


@pytest.fixture
def run_with_a_checkpoint(tmp_path, trained_teacher) -> Path:
    """A copy of a finished run's directory (the teacher's: mnv3_s_075 on the 10 synthetic classes)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_teacher.parent, run_dir)
    return run_dir


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_with_another_model_or_other_classes_is_refused_before_anything_is_written(
        run_with_a_checkpoint, synthetic_shards, tmp_path):
    before = files_of(run_with_a_checkpoint)
    common = (f"run_dir={run_with_a_checkpoint}", "logger.wandb.enabled=true", "logger.wandb.mode=offline",
              "trainer.max_epochs=2")
    with pytest.raises(Problems, match="its model is mobilenetv3_small_075, this run's mobilenetv3_small_100"):
        train(compose_run(*common, "model=mnv3_s_100", f"data.root={synthetic_shards}"))
    images = make_image_folder(tmp_path / "four", num_classes=4, train_per_class=4, val_per_class=2, size=32)
    make_shards(images, tmp_path / "four-shards", samples_per_shard=64, workers=1, progress=False)
    with pytest.raises(Problems, match="its data has 10 classes, this run's 4"):
        train(compose_run(*common, f"data.root={tmp_path / 'four-shards'}"))
    assert files_of(run_with_a_checkpoint) == before  # no W&B segment, no log row, no file


def test_a_fresh_start_over_a_run_is_refused_and_keeps_its_checkpoints_and_log_rows(run_with_a_checkpoint,
                                                                                   synthetic_shards):
    before = files_of(run_with_a_checkpoint)
    assert b"val/acc1" in before["csv/metrics.csv"]
    with pytest.raises(Problems, match="already holds a run .* ckpt_path=auto"):
        train(compose_run(f"run_dir={run_with_a_checkpoint}", f"data.root={synthetic_shards}", "ckpt_path=null"))
    assert files_of(run_with_a_checkpoint) == before
