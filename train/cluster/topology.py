"""How many nodes and processes per node a run has, when a launcher (srun, torchrun) started its processes.

A cluster user states the node and task counts once, to the launcher (`sbatch --nodes=2 --ntasks-per-node=8`,
`hydra.launcher.tasks_per_node=8`, `torchrun --nnodes=2 --nproc-per-node=8`); `trainer.num_nodes: auto` and
`trainer.devices: auto` then follow it, one device per process. Lightning would otherwise stop with a mismatch
between its `devices=auto` (all visible GPUs, or 1 CPU) and the launch.

Tasks bound to one GPU each (`srun --gpus-per-task=1`, or `--gpu-bind` giving each task its own) see only that GPU
(Slurm sets their CUDA_VISIBLE_DEVICES): Lightning's SLURM environment would have task k drive `cuda:k` among the
GPUs on the node and refuse `devices=8` when a task sees one (Lightning issue #16828). There each task drives the
one GPU it sees: `devices=1` a process, and `DeviceBoundSLURMEnvironment` (local device 0, the node's task count
checked against Slurm's instead of against `devices`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment


@dataclass(frozen=True)
class Launch:
    launcher: str
    nodes: int
    processes_per_node: int


def launched() -> Launch | None:
    """The launch this process belongs to (srun tasks, torchrun workers), or None (Lightning starts its own)."""
    if TorchElasticEnvironment.detect():
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return Launch("torchrun", nodes=max(1, world // local), processes_per_node=local)
    if SLURMEnvironment.detect():
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
        # "8" or "8(x2)": the same count on every node (Lightning's DDP needs that)
        match = re.match(r"(\d+)", per_node)
        tasks = int(match.group(1)) if match else int(os.environ.get("SLURM_NTASKS", "1")) // nodes
        return Launch("srun", nodes=nodes, processes_per_node=max(1, tasks))
    return None


def resolve(num_nodes: int | str, devices: int | str | list) -> tuple[int, int | str | list]:
    """`trainer.num_nodes` and `trainer.devices` with `auto` replaced by the launch's counts (outside a launch:
    one node, and Lightning's own `devices=auto`); one device a process where srun bound each task to one GPU."""
    launch = launched()
    if num_nodes == "auto":
        num_nodes = launch.nodes if launch else 1
    if devices == "auto" and launch:
        devices = 1 if gpus_bound_per_task(launch) else launch.processes_per_node
    return int(num_nodes), devices


def gpus_bound_per_task(launch: Launch | None) -> bool:
    """srun tasks of a node that each see fewer GPUs than the node has tasks: each bound to its own GPU(s)."""
    if launch is None or launch.launcher != "srun" or launch.processes_per_node < 2 or not torch.cuda.is_available():
        return False
    return torch.cuda.device_count() < launch.processes_per_node


class DeviceBoundSLURMEnvironment(SLURMEnvironment):
    """Lightning's SLURM environment for tasks bound to one GPU each: every task drives device 0 of what it sees
    (global rank and world size stay Slurm's), and Lightning's one device a process is not compared with the
    node's task count (that count is Slurm's to check)."""

    def local_rank(self) -> int:
        return 0

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        super().validate_settings(num_devices=int(os.environ.get("SLURM_NTASKS_PER_NODE", num_devices)),
                                  num_nodes=num_nodes)


def slurm_environment() -> SLURMEnvironment | None:
    """The SLURM environment of this launch (None outside Slurm), with Lightning's auto-requeue off: our
    RequeueOnSignal checkpoints and requeues at a safe step; Lightning's would too, from inside its signal handler."""
    if not SLURMEnvironment.detect():
        return None
    bound = gpus_bound_per_task(launched())
    return (DeviceBoundSLURMEnvironment if bound else SLURMEnvironment)(auto_requeue=False)
