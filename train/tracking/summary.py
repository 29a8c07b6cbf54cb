"""The run's comparison row: `<run dir>/summary.json` and the W&B summary hold the same values.

Kept current while the run trains (written at every validation, so a preempted or running job can be compared
too) and completed at the end with the export's numbers. It is what `python -m train.compare` reads offline and
what a W&B table shows online: best and final val top-1/top-5 (and the precision they were measured in), the
export's own fp32 top-1/top-5, params, MACs at the trained resolution, training images/s, wall-clock hours and
device-hours, the export's size on disk and batch-1 CPU latency in onnxruntime and LiteRT, the same for the int8
model when there is one, and the paper's numbers of the model beside them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from train.tracking.axes import EPOCH, IMAGES_SEEN, RunClock
from train.tracking.loggers import record_summary

SUMMARY_FILE = "summary.json"
FORMAT = "mobilenet-train/summary-v1"

# metrics.json of an export -> summary keys: (path in metrics.json, summary key)
EXPORT_KEYS = (
    (("top1",), "export/top1"), (("top5",), "export/top5"), (("precision",), "export/precision"),
    (("size_mb", "safetensors"), "export/size_mb"), (("size_mb", "onnx"), "export/onnx_size_mb"),
    (("latency_ms", "onnx_1thread"), "export/latency_ms_1thread"),
    (("latency_ms", "onnx_all_threads"), "export/latency_ms_all_threads"),
    (("tflite_top1",), "export/tflite_top1"), (("tflite_agreement",), "export/tflite_agreement"),
    (("size_mb", "tflite"), "export/tflite_size_mb"), (("latency_ms", "tflite_1thread"), "export/tflite_latency_ms"),
    (("tflite_error",), "export/tflite_error"),
    (("int8_torch_top1",), "int8/torch_top1"), (("int8_pte_top1",), "int8/pte_top1"),
    (("int8_onnx_top1",), "int8/onnx_top1"), (("int8_pte_top5",), "int8/pte_top5"),
    (("int8_onnx_top5",), "int8/onnx_top5"), (("fakequant_top1",), "int8/fakequant_top1"),
    (("float_top1",), "int8/float_top1"),
    (("size_mb", "int8_pte"), "int8/pte_size_mb"), (("size_mb", "int8_onnx"), "int8/onnx_size_mb"),
    (("latency_ms", "int8_onnx_1thread"), "int8/latency_ms_1thread"),
    (("latency_ms", "int8_onnx_all_threads"), "int8/latency_ms_all_threads"),
    (("latency_ms", "int8_pte"), "int8/pte_latency_ms"), (("latency_ms", "float_pte"), "int8/float_pte_latency_ms"),
    (("int8_tflite_top1",), "int8/tflite_top1"), (("int8_tflite_top5",), "int8/tflite_top5"),
    (("int8_tflite_agreement",), "int8/tflite_agreement"), (("size_mb", "int8_tflite"), "int8/tflite_size_mb"),
    (("latency_ms", "int8_tflite_1thread"), "int8/tflite_latency_ms"),
)


def export_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison values of an export's metrics.json."""
    out: dict[str, Any] = {}
    for path, key in EXPORT_KEYS:
        value: Any = metrics
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            out[key] = value
    return out


class RunSummary(Callback):
    """Writes `summary.json` (rank 0) after every validation and at the end of training; `finish` adds the export.

    `run`: what the run is (model key, timm name, recipe, distill, qat, seed, dataset, img size); `static`: values
    known before training (params, MACs); `paper`: the model config's published numbers; `provenance`: what the run
    was made from (train.provenance)."""

    def __init__(self, run_dir: Path, *, run: Mapping[str, Any], static: Mapping[str, Any],
                 paper: Mapping[str, Any] | None, provenance: Mapping[str, Any], clock: RunClock) -> None:
        self.path = Path(run_dir) / SUMMARY_FILE
        self.run = dict(run)
        # A resumed run continues its row (values of validations before the restart stay until they are renewed).
        previous = (read_summary(run_dir) or {}).get("summary", {})
        self.values: dict[str, Any] = {**previous, **static}
        self.paper = dict(paper or {})
        self.status, self.error = "starting", None
        self.provenance = dict(provenance)
        self.clock = clock
        self.values.update({f"paper/{k}": v for k, v in self.paper.items() if isinstance(v, (int, float))})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.status, self.error = "running", None
        self.values["val/precision"] = str(trainer.precision)  # what val/acc1 was measured in (export: fp32)
        self.values["devices"] = trainer.world_size
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        for key, out in (("val/acc1", "val/acc1_final"), ("val/acc5", "val/acc5_final"),
                         ("val/acc1_best", "val/acc1_best"), ("val/acc5_best", "val/acc5_best"),
                         ("val/teacher_acc1", "val/teacher_acc1"), ("val/teacher_agree", "val/teacher_agree"),
                         (EPOCH, "epochs"), (IMAGES_SEEN, IMAGES_SEEN)):
            if key in m:
                self.values[out] = float(m[key])
        self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.values["global_step"] = trainer.global_step
        self._write(trainer)

    def finish(self, trainer: Trainer, loggers: Sequence[Logger], export_metrics: Mapping[str, Any] | None) -> dict:
        """The final row: the training values and the export's; written and sent to W&B's summary."""
        if export_metrics:
            self.values.update(export_summary(export_metrics))
        self.values["global_step"] = trainer.global_step
        row = self.flat()  # one reading of the clock: summary.json and W&B hold the same cost values
        self.status = "finished"
        self._write(trainer, row)
        record_summary(loggers, row)
        return row

    def end(self, trainer: Trainer, error: BaseException | None) -> None:
        """A start that ended without finishing: `stopped` on a signal (it resumes), `failed` with the error."""
        self.status = "stopped" if error is None else "failed"
        self.error = None if error is None else f"{type(error).__name__}: {str(error).strip()[:500]}"
        self._write(trainer)

    def flat(self) -> dict[str, Any]:
        values = {**self.values, **_cost(self.clock)}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}

    @property
    def exported_best(self) -> bool:
        """Whether the exported (final) weights are the best the run validated."""
        final, best = self.values.get("val/acc1_final"), self.values.get("val/acc1_best")
        return final is not None and best is not None and final >= best

    def _write(self, trainer: Trainer, row: dict[str, Any] | None = None) -> None:
        if trainer.is_global_zero:
            _write_summary(self.path, {"format": FORMAT, "run": self.run, "status": self.status,
                                       **({"error": self.error} if self.error else {}),
                                       "summary": row or self.flat(), "paper": self.paper,
                                       "provenance": self.provenance})


def _cost(clock: RunClock) -> dict[str, float]:
    s = clock.summary()
    return {"perf/train_images_per_sec": s["train_images_per_sec"], "cost/wall_clock_h": s["wall_clock_h"],
            "cost/device_hours": s["device_hours"]}


@rank_zero_only
def _write_summary(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finished_run(run_dir: str | os.PathLike, *, max_epochs: int | None, max_steps: int,
                 export: bool) -> dict[str, Any] | None:
    """The summary of a run that already finished what these limits ask (and, with `export`, has an export newer
    than its last checkpoint); None when there is anything left to do (more epochs or steps, a missing or stale
    export)."""
    run_dir = Path(run_dir)
    recorded = read_summary(run_dir)
    if not recorded or recorded.get("status") != "finished":
        return None
    row = recorded.get("summary", {})
    if max_steps and max_steps > 0:
        done = row.get("global_step", 0) >= max_steps
    else:
        done = max_epochs is not None and max_epochs > 0 and row.get("epochs", 0) >= max_epochs
    metrics, last = run_dir / "export" / "metrics.json", run_dir / "checkpoints" / "last.ckpt"
    fresh = not export or metrics.is_file() and (not last.is_file() or metrics.stat().st_mtime >= last.stat().st_mtime)
    return recorded if done and fresh else None
