"""W&B artifacts: a run's export as a model artifact, and what a distillation run was made from as its inputs, so
W&B's lineage graph shows which student was distilled from which teacher on which kd sets.

- The export directory is logged as a `model` artifact named `export-<run id>`, with the numbers users compare as
  metadata (top-1, MACs, params, latency, model key, recipe) and the aliases `final` (always) and `best` (when the
  exported weights are the run's best by val top-1).
- A distillation run declares its teacher and its kd sets as inputs. A teacher that is an export of ours goes in
  under the name its own run logged it with (`export-<teacher run id>`) and the same files, so when both runs are
  synced W&B finds one artifact: the teacher run's output is the student run's input.
- Offline (the default), artifacts are recorded in the run's offline files and uploaded by `wandb sync` (files are
  referenced where they are, not copied: sync while the run and teacher directories are in place). W&B's public
  `use_artifact` refuses offline runs; offline, the input is recorded as an artifact logged with "use after
  commit", which is what `use_artifact` records for a new artifact online.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from distill.kdset import MANIFEST
from train.nets.files import CONFIG_FILE

log = logging.getLogger(__name__)


def _runs(loggers: Sequence[Logger]) -> list[Any]:
    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def export_artifact_name(run_dir: Path) -> str | None:
    """`export-<W&B run id>` of a run directory of ours, or None when the directory has no W&B run id."""
    path = Path(run_dir) / "wandb_run_id"
    return f"export-{path.read_text().strip()}" if path.is_file() else None


def _add_files(artifact: Any, directory: Path) -> None:
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        artifact.add_file(str(path.resolve()), name=path.name, policy="immutable")


@rank_zero_only
def log_export(loggers: Sequence[Logger], export_dir: Path, *, metadata: Mapping[str, Any], best: bool) -> None:
    """The export directory as this run's `model` artifact (see the module docstring)."""
    name = export_artifact_name(Path(export_dir).parent)
    for run in _runs(loggers):
        artifact = wandb.Artifact(name or f"export-{run.id}", type="model", metadata=dict(metadata),
                                  description=f"{metadata.get('model')} export of {Path(export_dir).parent}")
        _add_files(artifact, Path(export_dir))
        run.log_artifact(artifact, aliases=["final", *(["best"] if best else [])])


@rank_zero_only
def use_inputs(loggers: Sequence[Logger], *, teacher: Mapping[str, Any] | None,
               kd_sets: str | None, kd_identity: Mapping[str, Any] | None) -> None:
    """Declare the teacher and the kd sets a distillation run learns from as its input artifacts."""
    for run in _runs(loggers):
        if teacher:
            _use(run, _teacher_artifact(teacher))
        if kd_sets:
            sets = Path(kd_sets).resolve()
            digest = (kd_identity or {}).get("manifest_sha256")
            artifact = wandb.Artifact(f"kd-sets-{digest or sets.name}", type="dataset",
                                      metadata=dict(kd_identity or {}))
            if (sets / MANIFEST).is_file():
                artifact.add_file(str(sets / MANIFEST), name=MANIFEST, policy="immutable")
            artifact.add_reference(sets.as_uri(), name="sets", checksum=False)  # can be terabytes: the path only
            _use(run, artifact)


def _teacher_artifact(teacher: Mapping[str, Any]) -> Any:
    source = Path(str(teacher["source"]))
    metadata = {k: v for k, v in teacher.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if source.is_dir() and (source / CONFIG_FILE).is_file():  # an export dir of ours
        artifact = wandb.Artifact(export_artifact_name(source.parent) or f"teacher-{teacher['weights_sha256'][:16]}",
                                  type="model", metadata=metadata)
        _add_files(artifact, source)
        return artifact
    artifact = wandb.Artifact(f"teacher-{str(teacher['weights_sha256'])[:16]}", type="model", metadata=metadata)
    if source.is_file():  # a checkpoint of ours
        artifact.add_file(str(source.resolve()), name=source.name, policy="immutable")
    else:  # a timm name with a local weights file: the hash identifies it
        artifact.metadata["timm_name"] = str(source)
    return artifact


def _use(run: Any, artifact: Any) -> None:
    if run.offline:
        # What use_artifact records for a new artifact online; `wandb sync` replays it (see the module docstring).
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)
