"""Runs to compare: our run directories (offline), or W&B runs of a project (online), as one `RunData` each."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb

from data_pipes.errors import UserError
from train.tracking.summary import SUMMARY_FILE

CURVE_KEYS = ("epoch", "images_seen", "val/acc1")


class CompareError(UserError, ValueError):
    """The runs cannot be compared as asked; the message says why and what to pass instead."""


@dataclass
class RunData:
    name: str  # how the run is labelled in the table and the charts
    source: str  # its run directory, or its W&B path
    run: dict[str, Any]  # what the run is: model, architecture, recipe, distill, qat, seed, dataset, img size
    summary: dict[str, Any]  # the comparison values (train.summary's keys)
    paper: dict[str, Any] = field(default_factory=dict)  # the model config's published numbers
    provenance: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # val rows: epoch, images_seen, val/acc1
    status: str = "finished"  # finished | running | stopped (a signal; it resumes) | failed (with `error`)
    error: str | None = None

    @property
    def state(self) -> str:
        """The table's status cell: the state, and a failed run's error."""
        return f"{self.status}: {self.error[:80]}" if self.error else self.status

    def get(self, key: str) -> Any:
        return self.summary.get(key)

    @property
    def top1(self) -> float | None:
        """The number a run is ranked by: its export's fp32 top-1, else its best val top-1."""
        value = self.get("export/top1")
        return value if value is not None else self.get("val/acc1_best")


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file()


def find_runs(patterns: Sequence[str]) -> list[Path]:
    """Run directories named by `patterns`: directories, or globs (`runs/**`, `runs/*/2026-*`) matched against
    directories, keeping those that are runs. A named directory that is not a run is an error."""
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted({Path(p) for p in glob.glob(pattern, recursive=True)} |
                             ({Path(pattern[:-3])} if pattern.endswith("/**") else set()))
            runs = [p for p in matches if p.is_dir() and is_run_dir(p)]
            if not runs:
                raise CompareError(f"{pattern!r} matches no run directory (a directory holding {SUMMARY_FILE}, "
                                   f"which `python -m train` writes)")
            found += runs
            continue
        path = Path(pattern)
        if not path.is_dir():
            raise CompareError(f"{pattern}: no such directory")
        if not is_run_dir(path):
            below = [p.parent for p in path.glob(f"**/{SUMMARY_FILE}")]
            hint = (f"; it holds {len(below)} run(s): pass '{pattern.rstrip('/')}/**'" if below else
                    f"; a run directory is what `python -m train` writes (runs/<model>/<time>/, with {SUMMARY_FILE})")
            raise CompareError(f"{pattern} is not a run directory (no {SUMMARY_FILE}){hint}")
        found.append(path)
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


def load_run(path: Path, name: str | None = None) -> RunData:
    """A run directory of ours: its summary.json and the val rows of its CSV log."""
    path = Path(path)
    try:
        record = json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path / SUMMARY_FILE}: cannot be read ({e})") from None
    run = record.get("run") or {}
    return RunData(name=name or _label(run, path.name), source=str(path), run=run, summary=record.get("summary") or {},
                   paper=record.get("paper") or {}, provenance=record.get("provenance") or {},
                   curve=_csv_curve(path / "csv" / "metrics.csv"),
                   status=record.get("status", "finished"), error=record.get("error"))


def _label(run: Mapping[str, Any], fallback: str) -> str:
    parts = [run.get("model") or fallback, run.get("recipe")]
    parts += ["kd"] if run.get("distill") else []
    parts += ["qat"] if run.get("qat") else []
    return "-".join(str(p) for p in parts if p)


def unique_names(runs: list[RunData]) -> list[RunData]:
    """Runs sharing a label get their directory (or W&B id) appended, so table rows and legends stay apart."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({Path(r.source).name})"
    return runs


def _csv_curve(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc1") and r.get("images_seen")]
    return [{k: float(r[k]) for k in CURVE_KEYS} for r in rows]


# ------------------------------------------------------------------------------------------------ W&B (online)


def wandb_runs(project: str, filters: Mapping[str, str], *, api: Any = None) -> list[RunData]:
    """The runs of a W&B project (`ENTITY/PROJECT`) read through W&B's public API, filtered by equality: `tags=...`
    (our runs are tagged `model:<key>`, `recipe:<name>`, `family:<f>`, `distill:true|false`, `qat:true|false`),
    `state=finished`, or a config value (`recipe=paper`, `seed=1`: W&B's own filter path `config.<key>`)."""
    if api is None:
        api = wandb.Api()
    query = {("tags" if key == "tags" else key if key.startswith(("config.", "summary_metrics.", "state")) else
              f"config.{key}"): {"$in": [v]} if key == "tags" else _value(v) for key, v in filters.items()}
    runs = [from_wandb_run(r) for r in api.runs(project, filters=query or None)]
    if not runs:
        raise CompareError(f"W&B project {project} has no run matching {dict(filters) or 'anything'}")
    return runs


def from_wandb_run(run: Any) -> RunData:
    """A W&B run (public API object): its summary holds train.summary's keys, its config the composed config."""
    config = dict(run.config)
    model = config.get("model") or {}
    summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_") and _scalar(v)}
    described = {"model": model.get("key"), "architecture": model.get("name"), "recipe": config.get("recipe"),
                 "distill": config.get("distill"), "qat": config.get("qat"), "seed": config.get("seed"),
                 "img_size": summary.get("img_size")}
    curve = [{k: float(row[k]) for k in CURVE_KEYS} for row in run.scan_history(keys=list(CURVE_KEYS))
             if all(row.get(k) is not None for k in CURVE_KEYS)]
    return RunData(name=_label(described, run.name), source=f"wandb:{'/'.join(run.path)}", run=described,
                   summary=summary, paper=dict(model.get("paper") or {}), provenance=config.get("provenance") or {},
                   curve=curve, status=_WANDB_STATES.get(getattr(run, "state", "finished"), "finished"))


# W&B's run states -> ours (a crashed run stopped without saying why: failed)
_WANDB_STATES = {"finished": "finished", "running": "running", "failed": "failed", "crashed": "failed",
                 "killed": "stopped", "preempted": "stopped", "preempting": "stopped"}


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_filters(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompareError(f"--filter {item!r}: expected KEY=VALUE, e.g. model.key=mnv4_conv_s or recipe=paper")
        out[key] = value
    return out


def dataset_label(runs: Sequence[RunData]) -> str:
    names = sorted({f"{r.run.get('dataset')} ({r.run.get('num_classes')} classes)" for r in runs
                    if r.run.get("dataset")})
    return ", ".join(names) or "?"


def relpath(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path
