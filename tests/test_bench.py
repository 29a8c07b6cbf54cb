"""Smoke tests of the speed benchmarks: each runs end to end on tiny settings and ends with its ratio line.

Speed itself is not asserted (that is what the benchmarks are for, on a quiet machine).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

RATIO = r"\d+\.\d\dx"


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_train_step_runs_our_rows_says_where_timms_train_py_is_missing_and_prints_the_ratios_last(
        synthetic_folder, tmp_path, capsys):
    from bench.train_step import main

    assert main([
        "--src", str(synthetic_folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--model", "mnv3_s_100", "--img-size", "32", "--batch-size", "4", "--warmup", "1", "--steps", "2",
        "--repeats", "1", "--workers", "0", "--quiet", "--compiled", "eager", "--accuracy-epochs", "1",
        "--timm-train", str(tmp_path / "no-timm-here.py"),
    ]) == 0
    out = capsys.readouterr().out
    assert "timm's train.py: not found (make timm-train" in out
    assert "ours, eager, EMA off" in out and "ours, eager, EMA on" in out
    assert re.search(r"top-1 after [\d,]+ images \(1 epochs, eager, no EMA.*\): ours \d+\.\d\d % ", out), out
    assert re.search(r"ours / the step alone, eager, EMA off: \d+\.\d\dx", out), out
    assert re.fullmatch(r"EMA update alone, ours: \d+\.\d\d ms = \d+\.\d % of the eager step \([\d.]+ ms\)",
                        last_line(out)), out
    assert "ours / timm train.py, eager, EMA off: n/a" in out


FAKE_TRAIN_PY = """
import sys
from pathlib import Path

import torch

updates = int(sys.argv[sys.argv.index("--updates") + 1])
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(updates):
    optimizer.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
Path(sys.argv[sys.argv.index("--marker") + 1]).write_text("ran to its end")
"""


@pytest.mark.parametrize("updates, steps, outcome", [(20, 3, "timed"), (4, 3, "too_short"), (4, 0, "whole_run")])
def test_timm_peer_times_the_updates_after_warm_up_and_stops_the_script_or_lets_it_finish(
        tmp_path, updates, steps, outcome):
    """The peer runner's clock: a stand-in script (timm's train.py is not in CI) that steps an optimizer."""
    script, out, marker = tmp_path / "train.py", tmp_path / "result.json", tmp_path / "marker"
    script.write_text(FAKE_TRAIN_PY)
    done = subprocess.run(
        [sys.executable, "-m", "bench.timm_peer", "--script", str(script), "--batch-size", "8", "--warmup", "2",
         "--steps", str(steps), "--out", str(out), "--", "--updates", str(updates), "--marker", str(marker)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    if outcome == "timed":  # stopped after 2 + 3 updates: the script never reached its end
        assert done.returncode == 0, done.stderr
        assert json.loads(out.read_text())["images_per_second"] > 0 and not marker.exists()
    elif outcome == "too_short":
        assert done.returncode != 0 and "ended before 5 updates" in done.stderr
    else:
        assert done.returncode == 0 and marker.read_text() == "ran to its end"
        assert json.loads(out.read_text()) == {"finished": True}


@pytest.mark.slow
def test_loader_runs_ours_and_both_timm_variants_and_prints_the_ratio_last(synthetic_folder, tmp_path, capsys):
    from bench.loader import main

    assert main([
        "--src", str(synthetic_folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--img-size", "32", "--batch-size", "4", "--warmup", "1", "--batches", "2", "--repeats", "1",
        "--workers", "1", "--upscale", "80", "--quiet",
    ]) == 0
    out = capsys.readouterr().out
    for runner in ("ours (ShardDataModule)", "ours, full decode", "timm create_loader, folder",
                   "timm create_loader, wds"):
        assert sum(line.startswith(runner) for line in out.splitlines()) == 2, out  # a row in each setting's table
    assert "re-encoded at 80px" in out
    assert re.fullmatch(rf"ratio \(ours / faster timm\): {RATIO} flip \({RATIO} full decode\), {RATIO} randaug "
                        rf"\({RATIO} full decode\)", last_line(out)), out


@pytest.mark.slow
def test_distill_bench_builds_both_storages_times_three_loaders_and_prints_the_ratios_last(
        synthetic_folder, trained_teacher, tmp_path, capsys):
    from bench.distill import main

    assert main([
        "--src", str(synthetic_folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--teacher", str(trained_teacher), "--img-size", "32", "--batch-size", "4", "--warmup", "1", "--batches", "2",
        "--repeats", "1", "--workers", "1", "--replicas", "1", "--build-batch", "16", "--quiet",
    ]) == 0
    out = capsys.readouterr().out
    for row in ("build, params storage", "build, pixels storage", "labels only (ShardDataModule)",
                "replay (params storage)", "pixels storage", "decode the source JPEG(s)", "JPEG decode (round trip)",
                "library calls, total", "replay loader, end to end", "labels-only loader, end to end"):
        assert any(line.startswith(row) for line in out.splitlines()), out
    # the replay cost table: every step timed (views re-rendered, and checked against the loader's), then its bound
    steps = {line[:44].strip(): float(line[44:53]) for line in out.splitlines()
             if line[:44].strip() in ("decode the source JPEG(s)", "JPEG encode (round trip)", "library calls, total")}
    assert all(ms > 0 for ms in steps.values()) and steps["library calls, total"] >= steps["decode the source JPEG(s)"]
    assert re.search(rf"so replay tops out near {RATIO}", out), out
    assert re.fullmatch(rf"ratio \(vs labels-only loader\): {RATIO} replay, {RATIO} pixels", last_line(out)), out


@pytest.mark.slow
def test_eval_decode_bench_measures_a_trained_model_on_standard_and_reduced_pixels(synthetic_folder,
                                                                                  trained_teacher, tmp_path, capsys):
    from bench.eval_decode import main

    # The teacher was trained at 32 px; its 64 px photos (resized to 36 for a 32 px crop) decode at 1/1 as stored,
    # and at 1/4 re-encoded at 160 px: both sets, both decodes.
    assert main(["--export", str(trained_teacher), "--src", str(synthetic_folder), "--cache-dir",
                 str(tmp_path / "cache"), "--upscale", "160", "--batch-size", "25", "--workers", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| as stored |")
            or line.startswith("| re-encoded at 160 px |")]
    assert len(rows) == 4  # printed as measured, then in the table
    assert "| 50 | 1/1: 50 |" in rows[0] and "| 50 | 1/4: 50 |" in rows[1]
    assert rows[0].split("|")[6].strip() == "+0.00"  # no photo reduced: the same pixels, the same top-1


def test_the_slice_is_made_once_and_symlinks_the_photos(synthetic_folder, tmp_path):
    from bench.common import prepare_slice

    first = prepare_slice(synthetic_folder, tmp_path, train_per_class=3, val_per_class=1)
    again = prepare_slice(synthetic_folder, tmp_path, train_per_class=3, val_per_class=1)
    assert first == again and first.train_images == 3 * first.num_classes
    photos = list((first.images / "train").rglob("*.JPEG"))
    assert photos and all(p.is_symlink() for p in photos)
    assert (first.shards / "_info.json").is_file()


@pytest.mark.parametrize("argv", [["--warmup", "0"], ["--repeats", "0"]])
def test_bad_counts_are_refused(argv):
    from bench.loader import main as loader_main
    from bench.train_step import main as train_main

    for main in (loader_main, train_main):
        with pytest.raises(SystemExit):
            main(argv)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_check_on_the_cpu_and_prints_one_table(synthetic_folder, tmp_path, capsys):
    from bench.gpu_check import main

    # CI has no copy of timm's train.py (it is not in timm's wheel): that row says so, and the rest run.
    assert main(["--device", "cpu", "--smoke", "--src", str(synthetic_folder), "--cache-dir", str(tmp_path),
                 "--timm-train", str(tmp_path / "no-timm-here.py")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 13 and not any("FAILED" in row for row in rows), out
    assert any("train mnv3_s_100, ours (compile=true, bf16, channels_last) |" in row for row in rows), out
    assert any("resume on cpu: killed epoch end | equal to the uninterrupted run" in row for row in rows), out
    assert any("timm train.py | not run: timm's train.py not found" in row for row in rows), out
    assert any("QAT steps + int8 export | 3 QAT steps, val top-1" in row for row in rows), out  # no export on a CPU
    assert last_line(out) == "GPU check: every check passed (smoke, cpu)"


@pytest.mark.slow
def test_scale_bench_measures_each_stage_at_two_sizes_and_prints_the_growth_and_the_goals(tmp_path, capsys):
    from bench.scale import main

    assert main(["--sizes", "0.01", "0.012", "--stages", "make", "loader", "d3", "kdloader",
                 "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines() if ":" in line.split("  ")[0]}
    for figure in ("make: images/s a core", "loader: start-up s (process to 1st batch)", "d3: members (130,000 x 1000)",
                   "kd loader: worker descriptors", "loader: rank MB (main + 2 workers)"):
        assert figure in rows and "n/a" not in rows[figure], out
    assert "130,000,000" in rows["d3: members (130,000 x 1000)"]  # the default D3 at any size
    assert sum(line.startswith("  [") for line in out.splitlines()) == 7, out  # every goal judged


@pytest.mark.slow
def test_int8_speed_times_a_layer_kind_float_and_int8_in_litert_and_executorch(capsys):
    from bench.int8_speed import main

    pytest.importorskip("executorch", reason="the int8 extra: pip install 'mobilenet-train[int8]'")
    pytest.importorskip("litert_torch", reason="the litert extra: pip install 'mobilenet-train[litert]'")
    main(["--img-size", "32", "--layers", "depthwise"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| depthwise")]
    assert len(rows) == 2 and rows[0] == rows[1], rows  # printed as measured, then in the table
    assert len(re.findall(RATIO, rows[0])) == 2, rows[0]  # int8/float in each runtime


def test_int8_speed_refuses_an_unknown_layer_kind():
    from bench.int8_speed import main

    with pytest.raises(SystemExit, match="no such network; choose from"):
        main(["--layers", "winograd"])
