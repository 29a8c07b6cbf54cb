"""How many nodes and processes per node a run has, when a launcher (srun, torchrun) started its processes.

A cluster user states the node and task counts once, to the launcher (`sbatch --nodes=2 --ntasks-per-node=8`,
`hydra.launcher.tasks_per_node=8`, `torchrun --nnodes=2 --nproc-per-node=8`); `trainer.num_nodes: auto` and
`trainer.devices: auto` then follow it, one device per process. Lightning would otherwise stop with a mismatch
between its `devices=auto` (all visible GPUs, or 1 CPU) and the launch."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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
    one node, and Lightning's own `devices=auto`)."""
    launch = launched()
    if num_nodes == "auto":
        num_nodes = launch.nodes if launch else 1
    if devices == "auto" and launch:
        devices = launch.processes_per_node
    return int(num_nodes), devices
