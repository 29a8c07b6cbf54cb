"""Comparing runs: the axes every row carries, the summary row of each run, its provenance, the export as a W&B
artifact (and a distilled run's teacher as its input), and `python -m train.compare` over real run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_run
from timm.data import resolve_model_data_config
from wandb_records import artifacts, defined_metrics, history, records, run_config

from data_pipes.shards.metadata import info_sha256
from train.builders import datamodule_args
from train.compare.__main__ import main
from train.compare.plots import write_plots
from train.compare.runs import CompareError, RunData, from_wandb_run, parse_filters, wandb_runs
from train.compare.table import rows
from train.export.provenance import git_state
from train.run import train

pytestmark = [pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
              pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")]


# Runs that log to W&B (offline) every second step, for two epochs.
LOGGED = ("trainer.max_epochs=2", "trainer.log_every_n_steps=2", "logger.wandb.enabled=true",
          "logger.wandb.mode=offline")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_shards) -> dict[str, Path]:
    """Three real runs on the same data: batch 10 and batch 20 (labels only, exported), and a distilled student of
    the first (online, the first run's export as teacher)."""
    tmp = tmp_path_factory.mktemp("compare")
    dirs = {"b10": tmp / "b10", "b20": tmp / "b20", "kd": tmp / "kd"}
    train(compose_run(*LOGGED, f"run_dir={dirs['b10']}", f"data.root={synthetic_shards}", "data.batch_size=10"))
    train(compose_run(*LOGGED, f"run_dir={dirs['b20']}", f"data.root={synthetic_shards}", "data.batch_size=20",
                      "export_latency=false"))
    train(compose_run(*LOGGED, f"run_dir={dirs['kd']}", f"data.root={synthetic_shards}", "data.batch_size=20",
                      "distill=true", f"kd.teacher={dirs['b10'] / 'export'}", "kd.sources.d1.replicas=2",
                      "kd.sources.d2.replicas=2", "trainer.max_epochs=1", "export=false"))
    return dirs


def wandb_log(run_dir: Path) -> Path:
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return log


def val_axes(run_dir: Path) -> list[tuple[float, float]]:
    """(epoch, images_seen) of every validation row in the run's W&B history."""
    return [(row["epoch"], row["images_seen"]) for row in history(wandb_log(run_dir)) if "val/acc1" in row]


@pytest.mark.slow
def test_runs_with_different_batch_sizes_line_up_by_epoch_and_images_seen_in_wandb_and_csv(runs):
    # 200 train images: 20 steps an epoch at batch 10, 10 at batch 20; the same epochs and images at each validation
    assert val_axes(runs["b10"]) == val_axes(runs["b20"]) == [(1, 200), (2, 400)]
    rows = [row for row in history(wandb_log(runs["b10"])) if "train/loss" in row]
    assert [(row["trainer/global_step"], row["epoch"], row["images_seen"]) for row in rows][:2] == \
        [(1, 0.1, 20), (3, 0.2, 40)]  # logged at steps 2 and 4 (W&B labels them 1 and 3): 2 and 4 batches of 10
    declared = defined_metrics(wandb_log(runs["b10"]))
    assert declared["val/*"] == "epoch" and "epoch" in declared and "images_seen" in declared


@pytest.mark.slow
def test_each_run_carries_its_provenance_in_wandb_the_export_and_its_summary(runs, synthetic_shards):
    config = run_config(wandb_log(runs["b10"]))
    shipped = json.loads((runs["b10"] / "export" / "metrics.json").read_text())
    summary = json.loads((runs["b10"] / "summary.json").read_text())
    for record in (config["provenance"], shipped, summary["provenance"]):
        assert record["git"] == git_state() and set(record["git"]) == {"commit", "dirty"}
        assert set(record["versions"]) >= {"torch", "timm", "lightning", "cuda"}
        assert record["data"]["info_sha256"] == info_sha256(synthetic_shards)
    assert config["git"] == git_state()  # its own config key too
    assert isinstance(config["provenance"]["command"], str) and config["provenance"]["command"]
    kd = json.loads((runs["kd"] / "summary.json").read_text())["provenance"]["kd"]
    assert kd["teacher"]["source"] == str(runs["b10"] / "export") and kd["sets"] is None  # online: no kd sets


@pytest.mark.slow
def test_the_summary_is_the_comparison_row_in_summary_json_and_in_wandb(runs):
    summary = json.loads((runs["b10"] / "summary.json").read_text())["summary"]
    shipped = json.loads((runs["b10"] / "export" / "metrics.json").read_text())
    assert summary["export/top1"] == shipped["top1"] and summary["export/precision"] == "fp32"
    assert summary["val/precision"] == "32-true"  # what val/acc1 was measured in
    assert summary["val/acc1_best"] >= summary["val/acc1_final"] >= 0 and summary["epochs"] == 2
    assert summary["images_seen"] == 400 and summary["global_step"] == 40
    assert summary["model/macs_m"] > 0 and summary["model/params_m"] > 0
    assert summary["paper/top1"] == 65.4 and summary["paper/macs_m"] > 0  # conf/model/mnv3_s_075.yaml
    assert summary["perf/train_images_per_sec"] > 0 and summary["cost/device_hours"] == summary["cost/wall_clock_h"] > 0
    assert summary["export/size_mb"] == pytest.approx((runs["b10"] / "export" / "model.safetensors").stat().st_size
                                                      / 1e6)
    assert summary["export/latency_ms_1thread"] > 0 and summary["export/latency_ms_all_threads"] > 0
    # The same values in the W&B summary (the last summary record holds the final ones).

    final = {}
    for record in records(wandb_log(runs["b10"])):
        if record.WhichOneof("record_type") == "summary":
            final.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.summary.update})
    for key in ("export/top1", "model/macs_m", "cost/device_hours", "export/latency_ms_1thread", "paper/top1"):
        assert final[key] == summary[key], key  # the same reading, not two close ones


@pytest.mark.slow
def test_the_export_is_a_wandb_model_artifact_and_a_distilled_run_names_its_teacher_export_as_input(runs):
    run_id = (runs["b10"] / "wandb_run_id").read_text().strip()
    (export,) = [a for a in artifacts(wandb_log(runs["b10"])) if not a["input"]]
    assert export["name"] == f"export-{run_id}" and export["type"] == "model" and "final" in export["aliases"]
    assert set(export["files"]) == {"model.safetensors", "config.json", "model.onnx", "metrics.json"}
    summary = json.loads((runs["b10"] / "summary.json").read_text())["summary"]
    assert export["metadata"]["export/top1"] == summary["export/top1"] and export["metadata"]["model"] == "mnv3_s_075"
    assert {"model/macs_m", "model/params_m", "export/latency_ms_1thread", "recipe"} <= set(export["metadata"])
    assert ("best" in export["aliases"]) == (summary["val/acc1_final"] >= summary["val/acc1_best"])
    # The student's input is the teacher run's own export artifact: same name, same files, same digest.
    (teacher,) = [a for a in artifacts(wandb_log(runs["kd"])) if a["input"]]
    assert (teacher["name"], teacher["type"], teacher["digest"]) == (export["name"], "model", export["digest"])


@pytest.mark.slow
def test_compare_prints_the_table_and_writes_charts_with_a_point_per_run_and_paper_model(runs, tmp_path, capsys):
    assert main([str(runs["b10"]), str(runs["b20"]), str(runs["kd"]), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| run | status | model | recipe | kd |") and len(table) == 2 + 3
    assert all(line.split(" | ")[1] == "finished" for line in table[2:])
    assert "| mnv3_s_075-custom-kd |" in "\n".join(table) and "export top-1 (fp32)" in table[0]
    charts = json.loads((tmp_path / "cmp" / "plots.json").read_text())
    for name in ("val_top1_vs_epoch.png", "val_top1_vs_images_seen.png", "top1_vs_macs.png", "top1_vs_latency.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 10_000, name
    assert "float_vs_int8.png" not in charts  # no run has an int8 export
    # val curves: 2 validations for each labels-only run, 1 for the one-epoch student; the epoch and images axes of
    # the two batch sizes hold the same x values.
    by_epoch, by_images = charts["val_top1_vs_epoch.png"]["series"], charts["val_top1_vs_images_seen.png"]["series"]
    assert charts["val_top1_vs_epoch.png"]["points"] == 2 + 2 + 1
    assert [x for x, _ in by_images["mnv3_s_075-custom (b10)"]] == [x for x, _ in by_images["mnv3_s_075-custom (b20)"]]
    assert [x for x, _ in by_epoch["mnv3_s_075-custom (b10)"]] == [1.0, 2.0]
    # MACs: the 3 runs and the paper's point for their one model; latency: the 2 exports that measured it (b10) ...
    assert charts["top1_vs_macs.png"]["points"] == 3 + 1
    assert charts["top1_vs_latency.png"]["points"] == 1  # b10 only (b20: export_latency=false; kd: no export)

    assert main([str(runs["b10"]), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run,status,model,recipe,") and len(lines) == 2
    assert main([f"{runs['b10'].parent}/**", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


@pytest.mark.slow
def test_compare_refuses_a_directory_that_is_not_a_run(tmp_path, runs, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run directory (no summary.json)" in capsys.readouterr().err
    assert main([str(runs["b10"].parent)]) == 2  # a folder of runs: say how to name them
    assert f"it holds 3 run(s): pass '{runs['b10'].parent}/**'" in capsys.readouterr().err


class WandbRun:
    """The fields of a run of W&B's public API (`wandb.Api().runs(...)`) that train.compare reads (no server here)."""

    config = {"model": {"key": "mnv4_conv_s", "name": "mobilenetv4_conv_small", "paper": {"top1": 73.8}},
              "recipe": "paper", "distill": True, "qat": False, "seed": 1}
    summary = {"export/top1": 71.5, "model/macs_m": 186.0, "_runtime": 3, "img_size": 224}
    path = ["me", "mobilenet", "abc123"]
    name = "mnv4_conv_s-paper-kd-s1"

    @staticmethod
    def scan_history(keys):
        return [{"epoch": 1.0, "images_seen": 1e6, "val/acc1": 30.0}, {"epoch": 1.5, "images_seen": 1.5e6}]


def test_compare_reads_a_wandb_runs_summary_config_and_history_the_way_it_reads_a_run_dir():
    run = from_wandb_run(WandbRun())
    assert (run.name, run.top1, run.paper["top1"]) == ("mnv4_conv_s-paper-kd", 71.5, 73.8)
    assert run.curve == [{"epoch": 1.0, "images_seen": 1e6, "val/acc1": 30.0}] and "_runtime" not in run.summary
    assert run.source == "wandb:me/mobilenet/abc123"

    class Api:
        def runs(self, path, filters=None):
            self.asked = (path, filters)
            return [WandbRun()] if filters and filters.get("config.recipe") == "paper" else []

    api = Api()
    runs = wandb_runs("me/mobilenet", parse_filters(["tags=model:mnv4_conv_s", "recipe=paper", "seed=1"]), api=api)
    assert api.asked == ("me/mobilenet", {"tags": {"$in": ["model:mnv4_conv_s"]}, "config.recipe": "paper",
                                          "config.seed": 1}) and len(runs) == 1
    with pytest.raises(CompareError, match="has no run matching"):
        wandb_runs("me/mobilenet", {}, api=api)
    with pytest.raises(CompareError, match="expected KEY=VALUE"):
        parse_filters(["recipe"])


def test_validation_decodes_the_standard_eval_pixels_by_default(synthetic_shards):
    data_config = resolve_model_data_config(torch.nn.Linear(1, 1), args={"input_size": (3, 32, 32)})
    cfg = compose_run(f"data.root={synthetic_shards}")
    assert datamodule_args(cfg, data_config)["eval_transform"].dct_reduce is False
    cfg = compose_run(f"data.root={synthetic_shards}", "data.eval_dct_reduce=true")
    assert datamodule_args(cfg, data_config)["eval_transform"].dct_reduce is True


def _run(name: str, dataset: str, macs: float, top1: float, status: str = "finished") -> RunData:
    return RunData(name=name, source=name, run={"model": "mnv3_s_100", "dataset": dataset, "num_classes": 10},
                   summary={"model/macs_m": macs, "val/acc1_best": top1},
                   curve=[{"epoch": 1.0, "images_seen": 100.0, "val/acc1": top1 / 2},
                          {"epoch": 2.0, "images_seen": 200.0, "val/acc1": top1}], status=status)


def test_charts_draw_one_pareto_front_per_dataset_and_mark_failed_runs(tmp_path):
    runs = [_run("a", "imagenette", 50, 60), _run("b", "imagenette", 100, 70), _run("c", "shapes", 20, 90),
            _run("d", "shapes", 60, 95), _run("broken", "shapes", 30, 40, status="failed")]
    charts = write_plots(runs, tmp_path)
    fronts = charts["top1_vs_macs.png"]["fronts"]
    assert fronts == {"imagenette": [[50, 60], [100, 70]], "shapes": [[20, 90], [60, 95]]}  # never across data
    assert charts["val_top1_vs_epoch.png"]["failed"] == ["broken"]
    assert {r["run"]: r["status"] for r in rows(runs)} == {"a": "finished", "b": "finished", "c": "finished",
                                                            "d": "finished", "broken": "failed"}


def test_point_labels_neither_cover_each_other_nor_leave_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.compare.plots import _place_labels

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = [(f"run-number-{i}", 5 + 0.01 * i, 50 + 0.01 * i) for i in range(6)] + [("edge", 10.0, 99.0)]
    ax.scatter([p[1] for p in points], [p[2] for p in points])
    ax.set(xlim=(0, 10), ylim=(0, 100))
    _place_labels(fig, ax, [(name, x, y, "black") for name, x, y in points])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    assert len(boxes) == len(points)
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)
