"""The side-by-side table: one row per run, the summary's values in columns (markdown, CSV or JSON)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from train.compare.runs import RunData

# (header, value of a run, format). Missing values print as "-" (markdown) or empty (CSV) / null (JSON).
Column = tuple[str, Callable[[RunData], Any], str]


def _flag(value: Any) -> str:
    return "yes" if value else ""


def _summary(header: str, key: str, spec: str) -> Column:
    """A column holding one value of the run's summary (train.summary's key)."""
    return header, lambda r: r.get(key), spec


COLUMNS: list[Column] = [
    ("run", lambda r: r.name, "s"),
    ("status", lambda r: r.state, "s"),  # empty when finished; a failed run says so, and why
    ("model", lambda r: r.run.get("model"), "s"),
    ("recipe", lambda r: r.run.get("recipe"), "s"),
    ("kd", lambda r: _flag(r.run.get("distill")), "s"),
    ("qat", lambda r: _flag(r.run.get("qat")), "s"),
    ("img", lambda r: r.get("img_size") or r.run.get("img_size"), "d"),
    _summary("epochs", "epochs", ".3g"),
    _summary("val top-1 best", "val/acc1_best", ".2f"),
    _summary("val top-1 final", "val/acc1_final", ".2f"),
    _summary("val top-5 best", "val/acc5_best", ".2f"),
    _summary("val precision", "val/precision", "s"),
    _summary("export top-1 (fp32)", "export/top1", ".2f"),
    _summary("export top-5", "export/top5", ".2f"),
    _summary("int8 top-1 ExecuTorch", "int8/pte_top1", ".2f"),
    _summary("int8 top-1 onnxruntime", "int8/onnx_top1", ".2f"),
    _summary("LiteRT top-1", "export/tflite_top1", ".2f"),
    _summary("int8 top-1 LiteRT", "int8/tflite_top1", ".2f"),
    ("paper top-1", lambda r: r.get("paper/top1") or r.paper.get("top1"), ".1f"),
    _summary("params M", "model/params_m", ".2f"),
    _summary("MACs M", "model/macs_m", ".1f"),
    ("paper MACs M", lambda r: r.get("paper/macs_m") or r.paper.get("macs_m"), ".0f"),
    _summary("train img/s", "perf/train_images_per_sec", ",.0f"),
    _summary("wall h", "cost/wall_clock_h", ".3g"),
    _summary("device-h", "cost/device_hours", ".3g"),
    _summary("size MB", "export/size_mb", ".2f"),
    _summary("int8 MB", "int8/pte_size_mb", ".2f"),
    _summary("ORT ms 1 thread", "export/latency_ms_1thread", ".3g"),
    _summary("ORT ms all threads", "export/latency_ms_all_threads", ".3g"),
    _summary("int8 ORT ms 1 thread", "int8/latency_ms_1thread", ".3g"),
    _summary("LiteRT ms 1 thread", "export/tflite_latency_ms", ".3g"),
    _summary("int8 LiteRT ms 1 thread", "int8/tflite_latency_ms", ".3g"),
    _summary("int8 LiteRT MB", "int8/tflite_size_mb", ".2f"),
]


def rows(runs: Sequence[RunData], columns: Sequence[Column] = COLUMNS) -> list[dict[str, Any]]:
    """Raw values, one dict per run; columns no run has a value for are left out."""
    table = [{header: value(r) for header, value, _ in columns} for r in runs]
    kept = [h for h, _, _ in columns if any(row[h] not in (None, "") for row in table)]
    return [{h: row[h] for h in kept} for row in table]


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-"
    if spec == "s":
        return str(value)
    try:
        return format(int(value) if spec == "d" else float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def markdown(runs: Sequence[RunData]) -> str:
    table = rows(runs)
    if not table:
        return ""
    specs = {h: spec for h, _, spec in COLUMNS}
    headers = list(table[0])
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if specs[h] == "s" else "---:" for h in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(row[h], specs[h]) for h in headers) + " |" for row in table]
    return "\n".join(lines)


def to_csv(runs: Sequence[RunData]) -> str:
    table = rows(runs)
    out = io.StringIO()
    if table:
        writer = csv.DictWriter(out, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return out.getvalue()


def to_json(runs: Sequence[RunData]) -> str:
    """Every run's whole record (not only the table's columns): summary, run, paper numbers, provenance."""
    return json.dumps([{"name": r.name, "source": r.source, "run": r.run, "summary": r.summary, "paper": r.paper,
                        "provenance": r.provenance} for r in runs], indent=2, default=str)
