"""Where a run starts from: the checkpoint `ckpt_path` names, and the checks that keep a resume the same run.

`ckpt_path=auto` (the default) resumes the newest checkpoint of the run directory, so a requeued or restarted job
continues by itself. A resume must continue the same run: before anything of the new start is written (no W&B
segment, no log row, no file), the checkpoint's recorded model, classes, data and QAT switch are compared with this
run's, and a difference stops the start with what differs. A fresh start (`ckpt_path=null`) in a directory that
already holds a run is refused too: it would write over its checkpoints, logs and W&B run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data_pipes.errors import UserError
from data_pipes.shards.metadata import info_sha256

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"


class ResumeError(UserError, ValueError):
    """The checkpoint a start would resume is another run's, or a fresh start would overwrite a run."""


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`auto`: the newest of `<run dir>/checkpoints/last.ckpt` and Lightning's `<run dir>/hpc_ckpt_*.ckpt`, or None
    (a fresh start) when there is none; anything else is Lightning's (`last`, a path, None)."""
    if ckpt_path != "auto":
        return ckpt_path
    found = [p for p in [run_dir / CHECKPOINTS / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def check_start(ckpt_path: str | None, run_dir: Path, *, model_name: str, label_names: Sequence[str],
                data_root: str | os.PathLike, qat: bool) -> None:
    """Refuse a start that would resume another run's checkpoint, or start fresh over a run (see the module)."""
    if ckpt_path is None:
        held = sorted((run_dir / CHECKPOINTS).glob("*.ckpt")) if (run_dir / CHECKPOINTS).is_dir() else []
        if held:
            raise ResumeError(f"{run_dir} already holds a run ({held[0]}): ckpt_path=null would start a new run over "
                              f"its checkpoints, logs and W&B run. Resume it with ckpt_path=auto, or start the new "
                              f"run in another directory (hydra.run.dir=<dir>)")
        return
    path = run_dir / CHECKPOINTS / LAST if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        return  # Lightning's own names (best, hpc) and a missing file: Lightning says what it makes of them
    recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    differences = _differences(recorded, model_name=model_name, label_names=label_names, data_root=data_root,
                               qat=qat)
    if differences:
        raise ResumeError(f"resuming {path} would continue another run: {'; '.join(differences)}. Start this run in "
                          f"another directory (hydra.run.dir=<dir>), or set it back to the checkpoint's run")


def _differences(recorded: dict[str, Any], *, model_name: str, label_names: Sequence[str],
                 data_root: str | os.PathLike, qat: bool) -> list[str]:
    run_config, dataset = recorded.get("run_config") or {}, recorded.get("dataset") or {}
    out = []
    was = (run_config.get("model") or {}).get("name")
    if was is not None and was != model_name:
        out.append(f"its model is {was}, this run's {model_name}")
    was = dataset.get("label_names")
    if was is not None and list(was) != list(label_names):
        first = next((i for i, (a, b) in enumerate(zip(was, label_names)) if a != b), min(len(was), len(label_names)))
        out.append(f"its data has {len(was)} classes, this run's {len(label_names)} (first difference at index "
                   f"{first})")
    was = ((recorded.get("provenance") or {}).get("data") or {}).get("info_sha256")
    if was is not None and was != info_sha256(data_root):
        out.append(f"it trained on other shards ({dataset.get('root')}, _info.json {was}), this run on {data_root}")
    was = run_config.get("qat")
    if was is not None and bool(was) != bool(qat):
        out.append(f"it is {'a QAT' if was else 'a float'} run, this run is {'QAT' if qat else 'float'}")
    return out
