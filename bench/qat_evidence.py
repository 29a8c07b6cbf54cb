"""What does int8 cost, and what does QAT buy over PTQ? Float, PTQ and QAT int8 of three MobileNets, trained by our
pipeline on real photos (Imagenette), each int8 file measured in the runtime that runs it.

    python -m bench.qat_evidence                        # all three models (~45 min on 2 CPU cores; stages cached)
    python -m bench.qat_evidence --models mnv3_s_100    # one model

Data: every Imagenette train photo (9,469) and the whole val split (3,925) of `../shared/data/imagenette2-224`,
as shards made once under --cache-dir (shared with bench.distill_evidence). For each model, with our pipeline:
  float  python -m train model=M (labels, the default recipe) for --float-epochs at --img-size
  PTQ    python -m train.export <float>/checkpoints/last.ckpt --ptq --calib-batches N: the float model calibrated on
         N training batches (eval preprocessing), converted to int8
  QAT    python -m train model=M qat=true init_from=<float>/export for --qat-epochs (the quant group's lr factor; BN
         statistics frozen from --freeze-bn, observers from --freeze-observers)
"QAT float weights" is the QAT run's own weights without fake quantization (QAT also trains --qat-epochs more);
"QAT - float" compares the QAT int8 ExecuTorch model with the float model it started from.
Every top-1 is on the whole val split, with the float model's eval preprocessing: int8 PyTorch (the converted
model), ExecuTorch (model_int8.pte on XNNPACK) and onnxruntime (model_int8.onnx, QDQ). Sizes are the files' bytes;
latency is batch 1, ms per image, the median of repeated runs on this CPU, measured by the export (float and int8
in ExecuTorch; onnxruntime on 1 thread). Every stage is cached (a finished run's export is reused), so a killed run
resumes where it stopped. The table goes to stdout and to <cache-dir>/qat_evidence.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.common import DEFAULT_SRC, machine_summary
from bench.distill_evidence import DEFAULT_CACHE, compose, make_splits

MODELS = ("mnv3_s_100", "mnv2_100", "mnv4_conv_s")


def common(args, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.progress_bar=false",
            "logger.wandb.enabled=false", f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", "data.shuffle_window=1024", f"seed={args.seed}", "export=true"]


def timed(stage_dir: Path, done: Path, work) -> float:
    """Run `work()` unless `done` exists; returns the seconds it took (cached next to it)."""
    timing = stage_dir / "evidence_time.json"
    if not done.is_file():
        start = time.time()
        work()
        stage_dir.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": time.time() - start}))
    return json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")


def train_stage(name: str, overrides: list[str], run_dir: Path, log: list[str]) -> dict:
    from train.run import train

    def work():
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== {name}: python -m train {' '.join(overrides)}", flush=True)
        train(compose(overrides))

    seconds = timed(run_dir, run_dir / "export" / "metrics.json", work)
    log.append(f"{name}: python -m train {' '.join(overrides)}")
    return {**json.loads((run_dir / "export" / "metrics.json").read_text()), "seconds": seconds}


def ptq_stage(name: str, float_dir: Path, out: Path, args, log: list[str]) -> dict:
    from train.export import main as export_main

    argv = [str(float_dir / "checkpoints" / "last.ckpt"), "--ptq", "--calib-batches", str(args.calib_batches),
            "--out", str(out), "--batch-size", str(args.batch_size), "--num-workers", str(args.workers)]

    def work():
        shutil.rmtree(out, ignore_errors=True)
        print(f"== {name}: python -m train.export {' '.join(argv)}", flush=True)
        code = export_main(argv)
        if code not in (0, 3):  # 3: written, but a runtime fell below its agreement threshold (the table shows it)
            raise SystemExit(f"{name}: train.export exited {code}")

    seconds = timed(out, out / "metrics.json", work)
    log.append(f"{name}: python -m train.export {' '.join(argv)}")
    return {**json.loads((out / "metrics.json").read_text()), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--freeze-bn", type=int, default=1, help="QAT epoch from which BN statistics are frozen")
    p.add_argument("--freeze-observers", type=int, default=1, help="QAT epoch from which observers are frozen")
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.src / "train").is_dir():
        raise SystemExit(f"no photos at {args.src} (need train/<class>/<image> and val/): pass --src DIR")
    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    root = make_splits(args.src, cache, 0.2, args.seed)["all"]
    log: list[str] = []
    rows = []
    for model in args.models:
        runs = cache / "qat" / model
        float_dir = runs / "float"
        fl = train_stage(f"{model} float", [f"model={model}", f"data.root={root}",
                                            f"trainer.max_epochs={args.float_epochs}", "sched.warmup_epochs=2",
                                            f"optim.lr={args.lr}", *common(args, float_dir)], float_dir, log)
        ptq = ptq_stage(f"{model} PTQ", float_dir, runs / "ptq", args, log)
        qat_dir = runs / "qat"
        qat = train_stage(f"{model} QAT", [f"model={model}", f"data.root={root}", "qat=true",
                                           f"init_from={float_dir / 'export'}", f"trainer.max_epochs={args.qat_epochs}",
                                           f"optim.lr={args.lr}", "sched.warmup_epochs=0",
                                           f"quant.freeze_bn_epoch={args.freeze_bn}",
                                           f"quant.freeze_observer_epoch={args.freeze_observers}",
                                           *common(args, qat_dir)], qat_dir, log)
        rows.append((model, fl, ptq, qat))
        _report(args, cache, rows, log)


def _report(args, cache: Path, rows: list, log: list[str]) -> None:
    lines = [f"machine: {machine_summary(__import__('torch').device('cpu'))}",
             f"Imagenette (10 classes), {args.img_size} px; val top-1 on all 3,925 val photos", "",
             "| model | float | PTQ int8 PyTorch / ExecuTorch / onnxruntime | QAT float weights | QAT fake-quant | "
             "QAT int8 PyTorch / "
             "ExecuTorch / onnxruntime | QAT - float (ExecuTorch) | agreement QAT pte / onnx | MB float -> int8 pte "
             "| ms/img ExecuTorch float -> int8 | ms/img onnxruntime 1 thread float -> int8 | minutes float / QAT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, fl, ptq, qat in rows:
        def three(m):
            return f"{m['int8_torch_top1']:.2f} / {m['int8_pte_top1']:.2f} / {m['int8_onnx_top1']:.2f}"

        lat = qat["latency_ms"]
        float_mb = (cache / "qat" / model / "float" / "export" / "model.safetensors").stat().st_size / 1e6
        lines.append(
            f"| {model} | {fl['top1']:.2f} | {three(ptq)} | {qat['float_top1']:.2f} | {qat['fakequant_top1']:.2f} | "
            f"{three(qat)} | "
            f"{qat['int8_pte_top1'] - fl['top1']:+.2f} | {qat['int8_pte_agreement']:.1f} / "
            f"{qat['int8_onnx_agreement']:.1f} | {float_mb:.2f} -> {qat['size_mb']['int8_pte']:.2f} | "
            f"{lat['float_pte']:.2f} -> {lat['int8_pte']:.2f} | "
            f"{lat['onnx_1thread']:.2f} -> {lat['int8_onnx_1thread']:.2f} | "
            f"{fl['seconds'] / 60:.1f} / {qat['seconds'] / 60:.1f} |")
        for name, m in (("PTQ", ptq), ("QAT", qat)):
            kept = {**m.get("int8_kept_float", {})}
            if kept or m.get("pte_outside_xnnpack") or m.get("int8_failures"):
                lines.append(f"  {model} {name}: kept float {kept or '-'}; outside XNNPACK "
                             f"{m.get('pte_outside_xnnpack') or '-'}; failures {m.get('int8_failures') or '-'}")
    text = "\n".join([*lines, "", "commands:", *log])
    (cache / "qat_evidence.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
