"""`trainer.num_nodes: auto` and `trainer.devices: auto` follow the launch that started the process."""

from __future__ import annotations

import pytest

from train.cluster import topology

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


@pytest.mark.parametrize("visible", [8, 1], ids=["tasks_see_every_gpu", "one_gpu_bound_per_task"])
def test_srun_tasks_bound_to_one_gpu_each_drive_the_gpu_they_see(environ, monkeypatch, visible):
    environ({**SLURM, "SLURM_NNODES": "2"})
    monkeypatch.setattr(topology.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(topology.torch.cuda, "device_count", lambda: visible)
    environment = topology.slurm_environment()
    if visible == 8:  # Lightning's own: task k of the node drives cuda:k, 8 devices a node
        assert topology.resolve("auto", "auto") == (2, 8) and type(environment) is topology.SLURMEnvironment
        assert environment.local_rank() == 3
        return
    # --gpus-per-task=1: task 3 sees one GPU, its own; one device a process, global rank and world size Slurm's
    assert topology.resolve("auto", "auto") == (2, 1)
    assert isinstance(environment, topology.DeviceBoundSLURMEnvironment) and not environment.auto_requeue
    assert (environment.local_rank(), environment.global_rank(), environment.world_size()) == (0, 3, 16)
    environment.validate_settings(num_devices=1, num_nodes=2)  # Lightning's check passes with one device a task
    with pytest.raises(ValueError, match="num_nodes"):
        environment.validate_settings(num_devices=1, num_nodes=3)


def test_torchrun_workers_give_nodes_and_processes_per_node(environ):
    environ(TORCHRUN)
    assert topology.launched() == topology.Launch("torchrun", nodes=3, processes_per_node=4)
    assert topology.resolve("auto", "auto") == (3, 4)


@pytest.mark.ddp
@pytest.mark.slow
def test_a_two_node_torchrun_launch_trains_one_ddp_run_with_nodes_and_devices_from_the_launch(tmp_path,
                                                                                              synthetic_shards):
    """Two torchrun "nodes" on this machine (static rendezvous on localhost), one process each, no Slurm: the run
    learns 2 nodes x 1 device from torchrun alone and trains as one 2-rank DDP run."""
    import os
    import socket
    import subprocess
    import sys

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    overrides = [f"data.root={synthetic_shards}", "model=mnv3_s_075", "data.img_size=32", "data.batch_size=10",
                 "data.num_workers=0", "trainer.accelerator=cpu", "trainer.max_epochs=1", "export=false",
                 "logger.wandb.enabled=false", "callbacks.progress_bar=false", f"hydra.run.dir={run_dir}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "train", *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[0] + outputs[1]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 200 train images over 2 ranks at batch 10: 10 steps; both ranks' RNG states in the checkpoint
    assert ckpt["global_step"] == 10 and len(ckpt["rng_states"]) == 2
