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


def check_start(ckpt_path: str | None, run_dir: Path, *, model_name: str, label_names: Sequence[str] | None,
                data_root: str | os.PathLike | None, qat: bool) -> None:
    """Refuse a start that would resume another run's checkpoint, or start fresh over a run (see the module); a
    checkpoint that is named but absent, or that cannot be read, is refused with the ways on. Without data
    (`label_names`/`data_root` None: the data was refused already) the classes and shards are not compared."""
    if ckpt_path is None:
        held = sorted((run_dir / CHECKPOINTS).glob("*.ckpt")) if (run_dir / CHECKPOINTS).is_dir() else []
        if held:
            raise ResumeError(f"{run_dir} already holds a run ({held[0]}): ckpt_path=null would start a new run over "
                              f"its checkpoints, logs and W&B run. Resume it with ckpt_path=auto, or start the new "
                              f"run in another directory (hydra.run.dir=<dir>)")
        return
    path = named_checkpoint(ckpt_path, run_dir)
    if path is None:
        return  # Lightning's `hpc` and `registry`: Lightning finds (or refuses) those itself
    try:
        recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, pickle's errors, EOFError... for a damaged file
        raise ResumeError(unreadable_message(path, run_dir, e)) from e
    differences = _differences(recorded, model_name=model_name, label_names=label_names, data_root=data_root,
                               qat=qat)
    if differences:
        raise ResumeError(f"resuming {path} would continue another run: {'; '.join(differences)}. Start this run in "
                          f"another directory (hydra.run.dir=<dir>), or set it back to the checkpoint's run")


def named_checkpoint(ckpt_path: str, run_dir: Path) -> Path | None:
    """The file `ckpt_path` names, which must exist: `last` is the run directory's `checkpoints/last.ckpt`."""
    if ckpt_path in ("hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return None
    if ckpt_path == "last":
        path = run_dir / CHECKPOINTS / LAST
        if not path.is_file():
            raise ResumeError(
                f"ckpt_path=last resumes {path}, which does not exist: {_what_is_there(run_dir)}. Point "
                f"hydra.run.dir at the run to resume (its directory under runs/<model>/), or use ckpt_path=auto "
                f"(resume where there is a checkpoint, else start fresh) or ckpt_path=null (start fresh)")
        return path
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ResumeError(f"ckpt_path={ckpt_path} does not exist{' (it is a directory)' if path.is_dir() else ''}: "
                          f"name a checkpoint file (e.g. <run dir>/checkpoints/last.ckpt), or use ckpt_path=auto or "
                          f"ckpt_path=null")
    return path


def _what_is_there(run_dir: Path) -> str:
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return f"{run_dir} is a new, empty run directory"
    held = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("*.ckpt")) if (run_dir / CHECKPOINTS).is_dir() else []
    return f"{run_dir} holds {', '.join(held)}" if held else f"{run_dir} holds no checkpoint"


def unreadable_message(path: Path, run_dir: Path, error: Exception) -> str:
    """A damaged checkpoint: which file, why in one line, and the ways on (another checkpoint, or a fresh run)."""
    others = [p for p in sorted((path.parent).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
              if p != path] if path.parent.is_dir() else []
    reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
    ways = [f"ckpt_path={p}" for p in others[:3]]
    ways.append(f"ckpt_path=null hydra.run.dir=<a new directory> (a fresh run; {run_dir} stays as it is)")
    return (f"checkpoint {path} cannot be read ({type(error).__name__}: {reason[:200]}); it is damaged or not a "
            f"checkpoint. Resume from another checkpoint, or start fresh: {'; '.join(ways)}")


def _differences(recorded: dict[str, Any], *, model_name: str, label_names: Sequence[str] | None,
                 data_root: str | os.PathLike | None, qat: bool) -> list[str]:
    run_config, dataset = recorded.get("run_config") or {}, recorded.get("dataset") or {}
    out = []
    was = (run_config.get("model") or {}).get("name")
    if was is not None and was != model_name:
        out.append(f"its model is {was}, this run's {model_name}")
    was = dataset.get("label_names")
    if was is not None and label_names is not None and list(was) != list(label_names):
        first = next((i for i, (a, b) in enumerate(zip(was, label_names)) if a != b), min(len(was), len(label_names)))
        out.append(f"its data has {len(was)} classes, this run's {len(label_names)} (first difference at index "
                   f"{first})")
    was = ((recorded.get("provenance") or {}).get("data") or {}).get("info_sha256")
    if was is not None and data_root is not None and was != info_sha256(data_root):
        out.append(f"it trained on other shards ({dataset.get('root')}, _info.json {was}), this run on {data_root}")
    was = run_config.get("qat")
    if was is not None and bool(was) != bool(qat):
        out.append(f"it is {'a QAT' if was else 'a float'} run, this run is {'QAT' if qat else 'float'}")
    return out


def check_weights_fit(ckpt_path: str | None, run_dir: Path, module: torch.nn.Module) -> None:
    """The checkpoint's state has this run's module's names, and its parameters their shapes (what Lightning would
    otherwise report as a page of state-dict keys, after the run's W&B segment started); checked before anything is
    written. Buffers' shapes are not compared: observers of a fake-quantized network size theirs when they load."""
    path = None if ckpt_path is None else named_checkpoint(ckpt_path, run_dir)
    if path is None:
        return
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
    names = module.state_dict().keys()
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    shapes = [k for k, p in module.named_parameters() if k in state and tuple(state[k].shape) != tuple(p.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(keys)} {what} (first: {', '.join(keys[:3])})" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of other shapes", shapes)) if keys]
    raise ResumeError(f"the weights in {path} do not fit this run's network ({'; '.join(parts)}): it is another "
                      f"model or another setting of it. Resume it with the settings it was trained with, or start "
                      f"this run in another directory (hydra.run.dir=<dir>, or ckpt_path=null there)")
