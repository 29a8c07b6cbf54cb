"""`trainer.num_nodes: auto` and `trainer.devices: auto` follow the launch that started the process."""

from __future__ import annotations

import pytest

from train import topology

SLURM = {"SLURM_NTASKS": "16", "SLURM_JOB_NAME": "mobilenet", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "WORLD_SIZE": "12", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


@pytest.fixture
def environ(monkeypatch):
    for key in [*SLURM, *TORCHRUN, "SLURM_TASKS_PER_NODE", "SLURM_NNODES"]:
        monkeypatch.delenv(key, raising=False)

    def set_env(values: dict[str, str]) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    return set_env


def test_outside_a_launch_auto_is_one_node_and_lightnings_own_device_choice(environ):
    assert topology.launched() is None
    assert topology.resolve("auto", "auto") == (1, "auto")


def test_srun_tasks_give_nodes_and_tasks_per_node(environ):
    environ(SLURM)
    assert topology.launched() == topology.Launch("srun", nodes=2, processes_per_node=8)
    assert topology.resolve("auto", "auto") == (2, 8)
    assert topology.resolve(1, 2) == (1, 2)  # stated counts win (Lightning then checks them against the launch)


def test_srun_without_ntasks_per_node_reads_slurms_tasks_per_node_or_divides(environ):
    environ({**SLURM, "SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "8(x2)"})
    assert topology.resolve("auto", "auto") == (2, 8)
    environ({"SLURM_TASKS_PER_NODE": ""})
    assert topology.resolve("auto", "auto") == (2, 8)  # 16 tasks over 2 nodes


def test_torchrun_workers_give_nodes_and_processes_per_node(environ):
    environ(TORCHRUN)
    assert topology.launched() == topology.Launch("torchrun", nodes=3, processes_per_node=4)
    assert topology.resolve("auto", "auto") == (3, 4)
