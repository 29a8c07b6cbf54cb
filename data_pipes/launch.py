"""Which process of which launch this is, read from the launcher's environment before any process group exists.

Launchers: torchrun (TorchElastic's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `TORCHELASTIC_RUN_ID`), srun tasks (Slurm's
`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` inside a job step), Lightning's own launcher (`LOCAL_RANK`,
`NODE_RANK`, `WORLD_SIZE` in the processes it starts), Slurm array tasks (each a launch of its own). Code that runs
before Lightning sets up the processes (building kd sets, scoring D3, choosing the run directory) reads it here, so
that every process takes its own share and its own device, and all of them agree on one run directory.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipes.errors import UserError


@dataclass(frozen=True)
class Process:
    """This process's place in its launch: global rank and world size, and its index and count on its node."""

    launcher: str  # torchrun | srun | lightning | none
    rank: int
    world: int
    local_rank: int
    local_world: int


def this_process(environ: dict[str, str] | None = None) -> Process:
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        return Process("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # an srun task (the batch script itself has no step id)
        ntasks, nodes = int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_STEP_NUM_NODES", 1))
        return Process("srun", int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)),
                       max(1, ntasks // max(1, nodes)))
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:  # started by Lightning's launcher (rank 0 sets these too)
        local_world = int(env.get("LOCAL_WORLD_SIZE", 0)) or int(env["WORLD_SIZE"])
        rank = int(env.get("NODE_RANK", 0)) * local_world + int(env["LOCAL_RANK"])
        return Process("lightning", rank, int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), local_world)
    return Process("none", 0, 1, 0, 1)


def array_share(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(this task, number of tasks) of a Slurm job array: each task a separate launch with its own share of work."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def work_share(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(this share, number of shares) of work split over every process of the launch and every array task."""
    task, tasks = array_share(environ)
    process = this_process(environ)
    return task * process.world + process.rank, tasks * process.world


def local_device_index(visible: int, environ: dict[str, str] | None = None) -> int:
    """The accelerator this process drives among the `visible` ones: its index on the node when it sees them all,
    else 0 (a task bound to one device by its launcher, e.g. `srun --gpus-per-task=1`, sees only its own)."""
    process = this_process(environ)
    return process.local_rank if visible > process.local_rank else 0


def run_name(environ: dict[str, str] | None = None) -> str:
    """The run directory's name for this launch: the same in every process of it and on every restart of it (an
    elastic restart, a requeued Slurm job), and different for two launches, even started in the same second.

    - `MOBILENET_RUN_NAME` when set (slurm/train.sbatch sets slurm-<job>-<first start time>);
    - torchrun: `torchrun-<rendezvous id>` (`--standalone` makes a fresh id per launch; a multi-node launch names
      one with `--rdzv-id`, e.g. the job id); a single-node launch without an id: its agent's pid and start time;
    - srun tasks: `slurm-<job id>[_<array task>]`;
    - one process (or Lightning's own launcher, which hands its directory to the processes it starts): the start
      time and a random suffix.
    """
    env = os.environ if environ is None else environ
    if env.get("MOBILENET_RUN_NAME"):
        return env["MOBILENET_RUN_NAME"]
    process = this_process(env)
    if process.launcher == "torchrun":
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id not in ("", "none"):
            return f"torchrun-{run_id}"
        if process.world != process.local_world:
            raise UserError("a multi-node torchrun launch without a rendezvous id: its nodes cannot agree on a run "
                            "directory. Pass torchrun --rdzv-id=<unique id> (e.g. the job id), or "
                            "hydra.run.dir=<dir> to every node")
        agent = os.getppid()  # the elastic agent: the parent of every worker on this node, and of their restarts
        return f"torchrun-{socket.gethostname()}-{agent}-{_start_ticks(agent)}"
    if process.launcher == "srun":
        job = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
        return f"slurm-{job or env.get('SLURM_JOB_ID', 'job')}"
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{secrets.token_hex(2)}"


def _start_ticks(pid: int) -> str:
    """A process's start time (clock ticks since boot, from /proc): with its pid, unique on a host."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"
