"""Quantization-aware training runs of the pipeline (qat=true): 2-rank DDP with EMA, exact resume, int8 exports
measured in their runtimes, train.export of QAT and float (PTQ) checkpoints, and QAT with distillation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CPU_RUN, compose_run
from preemption import PreemptAt, Preemption
from safetensors.torch import load_file

from train.export import main
from train.export.checkpoint import quant_settings
from train.nets import litert
from train.nets.load import network_args, network_state
from train.quant.recipe import restore_network
from train.run import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
pytest.importorskip("executorch", reason="qat needs the int8 extra: pip install 'mobilenet-train[int8]'")


# The shapes need more than 32 px to be told apart; these runs ship LiteRT files too (float and int8).
SHAPES_RUN = ("data.img_size=64", "data.batch_size=25", "export_tflite=true")


def compose_overrides(*overrides: str) -> list[str]:
    return [*CPU_RUN, *SHAPES_RUN, *overrides]


def compose_shapes_run(*overrides: str):
    return compose_run(*SHAPES_RUN, *overrides)


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, shapes) -> Path:
    """A float model trained by the pipeline until its predictions are confident (top-1 agreement between
    runtimes means little on the near-uniform logits of an untrained one). 24 epochs: after 12 (about 40 % top-1)
    the margins were so small that on an AMD EPYC host (AVX-512 VNNI) ExecuTorch and onnxruntime agreed with the
    PyTorch int8 model on only 64-70 % of the images (the thresholds below failed at the commit before too); after
    24 (68 % top-1) they agree on 94 % and 90 %."""

    run_dir = tmp_path_factory.mktemp("float")
    train(compose_shapes_run(f"run_dir={run_dir}", f"data.root={shapes}", "trainer.max_epochs=24",
                      "optim.lr=4e-3", "optim.weight_decay=0.01", "sched.warmup_epochs=1", "label_smoothing=0.0",
                      "model.drop_rate=0.0", "aug.train.scale=[0.35,1.0]"))
    metrics = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert metrics["top1"] >= 30  # well above chance (10 %)
    if litert.available():  # the float export in LiteRT: the same top-1 as PyTorch, image by image
        assert metrics["tflite_top1"] == metrics["top1"] and metrics["tflite_agreement"] >= 98.0, metrics
    return run_dir / "export"


def qat_overrides(shapes: Path, float_export: Path, run_dir: Path, *extra: str, drop_rate: float = 0.0,
                  weight_bits: int = 8) -> list[str]:
    # Both freezes at epoch 1 of 2; EMA on; a checkpoint every step (for the resume test).
    return ["qat=true", f"init_from={float_export}", f"data.root={shapes}", "trainer.max_epochs=2",
            f"quant.weight_bits={weight_bits}",
            "quant.freeze_bn_epoch=1", "quant.freeze_observer_epoch=1", "ema.decay=0.9", f"model.drop_rate={drop_rate}",
            "callbacks.checkpoint.every_n_train_steps=1", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, shapes, float_export, weight_bits):
    """A 2-rank DDP (gloo) QAT run of the pipeline from float_export, with EMA, exported to int8 and measured, as
    a user launches it (Lightning re-executes the script for rank 1). Returns its run dir and each rank's record."""

    tmp = tmp_path_factory.mktemp("qat")
    run_dir, out = tmp / "run", tmp / "ranks"
    # The float model is trained only so far (about 40-70 % top-1 on 10 shapes): small logit margins, so top-1
    # agreement between integer kernels and the PyTorch reference is lower than on a well trained model. The
    # thresholds here: ExecuTorch 75 %, onnxruntime 70 %, LiteRT 75 % (measured 78-84 % and 76-80 %; the defaults,
    # for trained models: 90 %, 75 % and 90 %).
    # weight_bits: 7 on x86 CPUs without VNNI, where onnxruntime's int8 kernels overflow with 8-bit weights (conftest).
    # Top-1 is measured on 50 val images (2 points an image): int8 may lose up to 5 of them (measured: 0-3 with
    # 8-bit weights, 3 with 7-bit ones) before the export reports a failure.
    overrides = compose_overrides(*qat_overrides(shapes, float_export, run_dir, "quant.min_agreement.pte=75",
                                                 "quant.min_agreement.onnx=70", "quant.min_agreement.tflite=75",
                                                 "quant.max_top1_drop=10",
                                                 "trainer.devices=2", "trainer.strategy=ddp", weight_bits=weight_bits))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "ddp_train_run.py"), str(out),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_rank_ddp_qat_run_trains_both_ranks_alike_and_ships_int8_measured_in_each_runtime(qat_run, float_export,
                                                                                             weight_bits):
    run_dir, ranks = qat_run
    # Each rank read its own half of the data; DDP averaged the gradients and broadcast rank 0's buffers (BN
    # statistics, observer ranges, frozen flags): both ranks end with the same weights and scales.
    assert [r["world_size"] for r in ranks] == [2, 2] and [len(r["batches"]) for r in ranks] == [24, 24]
    for epoch in (0, 1):  # within an epoch, the ranks read disjoint samples
        seen = [{k for b in r["batches"] if b["epoch"] == epoch for k in b["keys"]} for r in ranks]
        assert seen[0] and not seen[0] & seen[1]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and any(k.endswith(".scale") for k in a)
    assert all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a), [k for k in a if a[k] != b[k]][:5]
    assert a["frozen_bn"] == a["frozen_observers"] == 1.0

    export = run_dir / "export"
    for name in ("model.safetensors", "model.onnx", "model_int8.pte", "model_int8.onnx"):
        assert (export / name).is_file(), name
    shipped = json.loads((export / "metrics.json").read_text())
    for key in ("float_top1", "fakequant_top1", "int8_torch_top1", "int8_pte_top1", "int8_onnx_top1",
                "int8_pte_top5", "int8_pte_agreement", "int8_onnx_agreement", "int8_pte_max_abs_diff"):
        assert key in shipped, key
    # Each runtime agrees with the PyTorch int8 model above its threshold, and QAT kept the float model's top-1
    # within 5 of the 50 val images.
    assert shipped["int8_failures"] == [], shipped["int8_failures"]
    assert shipped["int8_pte_agreement"] >= 75.0 and shipped["int8_onnx_agreement"] >= 70.0
    # Agreement on the images the int8 model decides (top-2 logits two or more output steps apart) beside it.
    assert shipped["int8_output_step"] > 0 and 0 <= shipped["int8_decided"] <= 100
    assert {"int8_pte_agreement_decided", "int8_onnx_agreement_decided"} <= shipped.keys()
    if litert.available():  # LiteRT: both files, from the same QAT graph, measured like the other runtimes
        assert (export / "model.tflite").is_file() and (export / "model_int8.tflite").is_file()
        assert shipped["int8_tflite_agreement"] >= 75.0 and shipped["tflite_agreement"] >= 98.0
        assert shipped["size_mb"]["int8_tflite"] < 0.5 * shipped["size_mb"]["tflite"]
        assert {"tflite_1thread", "int8_tflite_1thread"} <= set(shipped["latency_ms"])
        assert shipped["int8_tflite_float_ops"].get("MEAN", 0) > 0  # the squeeze-excite means, as in PyTorch int8
    assert shipped["val_images"] == 50
    # Against the float model QAT started from: 7-bit weights (CPUs without VNNI) cost more than 8-bit ones. Measured:
    # 0-6 points with 8-bit weights; with 7-bit, 14 (the QAT run's own float weights lost 12 of them, its int8 model 2
    # more), so the bound there is 16 (8 of the 50 images).
    float_top1 = json.loads((float_export / "metrics.json").read_text())["top1"]
    bound = 10.0 if weight_bits == 8 else 16.0
    assert shipped["int8_pte_top1"] >= float_top1 - bound, (shipped["int8_pte_top1"], float_top1)
    assert shipped["int8_pte_top1"] >= shipped["float_top1"] - 10.0  # and against its own float weights
    assert shipped["size_mb"]["int8_pte"] < 0.5 * (export / "model.safetensors").stat().st_size / 1e6
    assert set(shipped["latency_ms"]) >= {"float_pte", "int8_pte", "onnx_1thread", "onnx_all_threads",
                                          "int8_onnx_1thread", "int8_onnx_all_threads"}  # float and int8, side by side
    assert shipped["size_mb"].keys() >= {"safetensors", "onnx", "int8_pte", "int8_onnx"}
    assert shipped["size_mb"]["int8_onnx"] <= shipped["size_mb"]["onnx"]
    # The run's comparison row holds the int8 numbers beside the float ones, and the cost of both ranks.
    summary = json.loads((run_dir / "summary.json").read_text())["summary"]
    assert summary["int8/pte_top1"] == shipped["int8_pte_top1"] and summary["int8/onnx_top1"] == shipped[
        "int8_onnx_top1"]
    assert summary["int8/pte_size_mb"] < summary["export/size_mb"] and summary["int8/latency_ms_1thread"] > 0
    assert summary["devices"] == 2
    if litert.available():
        assert summary["int8/tflite_top1"] == shipped["int8_tflite_top1"]
        assert summary["export/tflite_top1"] == shipped["tflite_top1"]
    assert summary["cost/device_hours"] == pytest.approx(2 * summary["cost/wall_clock_h"], rel=1e-3)
    # MNv3's squeeze-excite means stay float (XNNPACK's quantizer does not annotate mean), and the report says so.
    assert shipped["int8_kept_float"].get("mean", 0) > 0, shipped["int8_kept_float"]
    # The checkpoint holds the fake-quant network (EMA weights in state_dict, the trained ones beside them), its
    # frozen state included in both.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.graph.") and k.endswith(".scale") for k in ckpt["state_dict"])
    for state in (ckpt["state_dict"], ckpt["current_model_state"]):
        assert state["model.frozen_bn"] and state["model.frozen_observers"]


@pytest.mark.slow
def test_a_qat_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_weights_and_scales(tmp_path, shapes,
                                                                                        float_export):


    def run(run_dir: Path, *extra: str, callbacks=()):
        # Dropout on: the dropout node of the exported graph draws from the global RNG, which the checkpoint holds.
        return train(compose_shapes_run(*qat_overrides(shapes, float_export, run_dir, "export=false", *extra,
                                                drop_rate=0.2)),
                     callbacks=callbacks)

    run(tmp_path / "a")
    with pytest.raises(Preemption):
        run(tmp_path / "b", callbacks=[PreemptAt(30)])  # in epoch 1 (24 steps an epoch), after BN and observers froze
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and 24 < ckpt["global_step"] < 48
    run(tmp_path / "b", "ckpt_path=last")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 48
    for part in ("state_dict", "current_model_state"):  # EMA and trained weights, BN statistics, scales, flags
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # The checkpoint records the rates the network was built with: python -m train.export rebuilds the same graph
    # (its dropout op and that op's observer) and loads the resumed run's state into it.
    assert b["network_args"]["drop_rate"] == 0.2
    restore_network(b["run_config"]["model"]["name"], len(b["dataset"]["label_names"]),
                    b["data_config"]["input_size"][-1], quant_settings(b, latency=False, ptq_observer=None),
                    network_state(b["state_dict"]), network_args(b))


@pytest.mark.slow
def test_train_export_ships_int8_from_a_qat_checkpoint_and_fails_loudly_below_the_agreement_threshold(
        tmp_path, qat_run, capsys):
    # The QAT run's checkpoint with an agreement threshold no runtime can reach: the export is written, and says so.
    ckpt = torch.load(qat_run[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["run_config"]["quant"]["min_agreement"]["pte"] = 101.0
    ckpt["run_config"]["quant"]["max_top1_drop"] = -200.0  # and an int8 model "too far below" float, whatever it is
    strict = tmp_path / "strict.ckpt"
    torch.save(ckpt, strict)
    assert main([str(strict), "--out", str(tmp_path / "out"), "--num-workers", "1", "--batch-size", "25",
                 "--no-latency", "--no-tflite"]) == 3
    err = capsys.readouterr().err
    assert "is below quant.min_agreement.pte=101.0%" in err and "(quant.max_top1_drop=-200.0)" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (tmp_path / "out" / "model_int8.pte").is_file() and len(metrics["int8_failures"]) == 2
    # The same int8 numbers as the run's own export: the checkpoint rebuilds the same network.
    shipped = json.loads((qat_run[0] / "export" / "metrics.json").read_text())
    assert metrics["int8_torch_top1"] == shipped["int8_torch_top1"]


@pytest.mark.slow
def test_bench_deploy_measures_a_qat_export_float_and_int8_in_every_runtime(tmp_path, qat_run, capsys):
    from bench.deploy import main as deploy_main

    if not litert.available():
        pytest.skip("the litert extra is not installed: pip install -e '.[litert]' (make test installs it)")
    deploy_main(["--exports", str(qat_run[0] / "export"), "--cache-dir", str(tmp_path), "--batch-size", "25",
                 "--workers", "1"])
    table = (tmp_path / "deploy.md").read_text()
    assert table in capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| mobilenetv3_small_075 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    float_top1 = [float(v) for v in cells[1].split(" / ")]  # PyTorch, ExecuTorch, onnxruntime, LiteRT
    assert len(float_top1) == 4 and max(float_top1) - min(float_top1) <= 2.0, cells  # one image of 50 at most
    shipped = json.loads((qat_run[0] / "export" / "metrics.json").read_text())
    assert float_top1[0] == pytest.approx(shipped["top1"], abs=0.01)
    assert cells[3] == " / ".join(f"{shipped[f'int8_{k}_top1']:.2f}" for k in ("torch", "pte", "onnx", "tflite"))
    decided = f"- mobilenetv3_small_075: on the {shipped['int8_decided']:.1f}% of photos the int8 model decides"
    assert decided in table, table  # agreement where the int8 model is not within a step of a tie, under the table


@pytest.mark.slow
def test_qat_with_distill_learns_from_the_float_model_of_init_from_by_default(tmp_path, shapes, float_export):


    class TeacherSpy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.teacher = pl_module.objective.teacher

    spy = TeacherSpy()
    run_dir = tmp_path / "qat_kd"
    metrics = train(compose_shapes_run("qat=true", "distill=true", "kd=logit", f"init_from={float_export}",
                                f"data.root={shapes}", "trainer.max_epochs=1", "export=false", f"run_dir={run_dir}"),
                    callbacks=[spy])
    assert metrics["val/acc1"] > 0 and metrics["val/teacher_acc1"] > 0
    assert spy.teacher.source == str(float_export)
    weights = load_file(str(float_export / "model.safetensors"))
    teacher_state = spy.teacher.model.state_dict()
    assert all(torch.equal(teacher_state[k].cpu(), v) for k, v in weights.items())  # the float model, untouched
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["run_config"]["qat"] and ckpt["run_config"]["distill"]


@pytest.mark.slow
def test_post_training_quantization_of_a_float_checkpoint_exports_and_measures_int8(tmp_path, float_export,
                                                                                     weight_bits):
    # The float model is trained only so far (about 40-70 % top-1): small logit margins, so the thresholds here are
    # ExecuTorch 70 %, onnxruntime 65 % top-1 agreement with the PyTorch int8 model (set in a copy's run config).
    ckpt = torch.load(float_export.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["run_config"]["quant"]["min_agreement"] = {"pte": 70.0, "onnx": 65.0, "tflite": 70.0}
    # 50 val images, 2 points each: PTQ calibrated on 4 batches may lose up to 5 of them (measured: 0-3).
    ckpt["run_config"]["quant"]["max_top1_drop"] = 10.0
    ckpt["run_config"]["quant"]["weight_bits"] = weight_bits  # 7 where onnxruntime's kernels overflow (conftest)
    path = tmp_path / "float.ckpt"
    torch.save(ckpt, path)
    assert main([str(path), "--ptq", "--calib-batches", "4", "--out", str(tmp_path / "ptq"), "--num-workers", "1",
                 "--batch-size", "25", "--data-root", str(ckpt["dataset"]["root"]), "--no-latency"]) == 0
    metrics = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    assert metrics["int8_failures"] == [] and metrics["int8_pte_agreement"] >= 70.0
    if litert.available():  # the same calibration in LiteRT (measured 88 % on a CPU without VNNI)
        assert metrics["int8_tflite_agreement"] >= 70.0 and (tmp_path / "ptq" / "model_int8.tflite").is_file()
    assert "fakequant_top1" not in metrics  # a calibrated PTQ graph computes in float: no fake-quant number to give
    assert "latency_ms" not in metrics  # --no-latency: no float program lowered just to time it
    assert abs(metrics["float_top1"] - json.loads((float_export / "metrics.json").read_text())["top1"]) < 1e-6
    with pytest.raises(SystemExit):
        main([str(path), "--calib-batches", "x"])

