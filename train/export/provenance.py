"""What a run (and so what it ships) was made from: in its checkpoints, so every export of it carries it too.

Recorded in the W&B config, the checkpoints, `summary.json` and the export's `metrics.json` (a re-export adds its own
command and code under the run's, as `trained`).

The code (git commit and whether the tree had uncommitted changes), the command line, the library versions the
numbers depend on, the shard set (its root and a hash of its `_info.json`), and for distillation the teacher and the
kd sets (their identities: source, weights hash, manifest). Two runs with equal provenance and seed are the same
experiment; where they differ, this says how.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import lightning
import timm
import torch

from data_pipes.shards.metadata import info_sha256

REPO = Path(__file__).resolve().parents[2]


@cache
def git_state(repo: Path = REPO) -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout the code runs from; both None outside a git checkout (an installed
    wheel) or where git is missing."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    # Tracked files changed or staged; untracked files are not part of the code that ran unless imported, and
    # runs/ and caches are ignored anyway.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
             "lightning": lightning.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    # Plain strings: torch's version is a str subclass that checkpoints' safe loader (weights_only) refuses.
    return {k: None if v is None else str.__str__(str(v)) for k, v in found.items()}


def command_line() -> str:
    """The command as typed (module runs as `python -m <module>`), quoted so it can be pasted back."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m train ...: argv[0] is the module's file path
        module = spec.name.removesuffix(".__main__")
        argv = ["python", "-m", module, *argv[1:]]
    return shlex.join(argv)


def run_provenance(data_root: str | os.PathLike, kd: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything above, as plain JSON values. `kd`: the distillation record (teacher and kd sets identities)."""
    record: dict[str, Any] = {"git": git_state(), "command": command_line(), "versions": versions(),
                              "data": {"root": str(data_root), "info_sha256": info_sha256(data_root)}}
    if kd:
        record["kd"] = {"teacher": kd.get("teacher"), "sets": kd.get("sets")}
    return record
