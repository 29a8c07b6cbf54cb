"""The zoo in every runtime: one model of each MobileNet family, trained by our pipeline on real photos (Imagenette),
shipped float and int8 (QAT), each file measured in the runtime that runs it: PyTorch, ExecuTorch, onnxruntime and
LiteRT.

    python -m bench.deploy                                   # the six models (stages cached under --cache-dir)
    python -m bench.deploy --models mnv3_s_100 mnv4_hybrid_m # some of them
    python -m bench.deploy --exports RUN/export ...          # given QAT exports of ours instead of training

For each model, with our pipeline (the stages of bench.qat_evidence):
  float  python -m train model=M for --float-epochs at --img-size (labels, the default recipe)
  QAT    python -m train model=M qat=true init_from=<float>/export for --qat-epochs; its export writes the float files
         (model.onnx, model.tflite) and the int8 ones (model_int8.pte / .onnx / .tflite) from one QAT graph
Then every file of the QAT export is evaluated on the whole val split in one pass: the float network in PyTorch,
onnxruntime (model.onnx), ExecuTorch (a float .pte lowered here) and LiteRT (model.tflite); int8 as the export
measured it (PyTorch int8, each runtime, agreement with PyTorch int8). Sizes are the files' bytes; latency is batch 1,
one thread, ms per image, the export's own medians on this CPU. What stays float (by the quantizer, or in LiteRT
between a DEQUANTIZE and a QUANTIZE) and what runs outside XNNPACK is listed under the table.
The table goes to stdout and to <cache-dir>/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_SRC, machine_summary
from bench.distill_evidence import DEFAULT_CACHE, make_splits
from bench.qat_evidence import common, train_stage

# V1, V2, V3-Small, V3-Large, MNv4-Conv-S, MNv4-Hybrid-M
MODELS = ("mnv1_100", "mnv2_100", "mnv3_s_100", "mnv3_l_100", "mnv4_conv_s", "mnv4_hybrid_m")


def float_runtimes(export_dir: Path, batch_size: int, workers: int, data_root: Path | None = None
                   ) -> dict[str, dict[str, float]]:
    """Top-1 of the float network in each runtime over the export's val split, and each one's agreement with
    PyTorch (one pass: every runtime sees the same pixels)."""
    from train.export.checkpoint import build_val_loader
    from train.nets import litert
    from train.nets.evaluate import measure
    from train.nets.load import load_exported
    from train.quant.deploy import OnnxRunner, PteRunner, write_pte

    model = load_exported(export_dir).eval()
    config = json.loads((export_dir / "config.json").read_text())["pretrained_cfg"]
    metrics = json.loads((export_dir / "metrics.json").read_text())
    size = int(config["input_size"][-1])
    loader = build_val_loader(data_root or _data_root(export_dir), config, batch_size=batch_size,
                              num_workers=workers, dct_reduce=False, max_bad_fraction=0.0)
    runners: dict[str, Any] = {"torch": model, "onnx": OnnxRunner(export_dir / "model.onnx")}
    with tempfile.TemporaryDirectory() as tmp:
        pte = write_pte(model, Path(tmp) / "float.pte", size)
        runners["pte"] = PteRunner(Path(tmp) / "float.pte", pte.dynamic, size)
        if (export_dir / "model.tflite").is_file():
            runners["tflite"] = litert.TfliteRunner(export_dir / "model.tflite")
        return measure(runners, "torch", loader, mean=config["mean"], std=config["std"],
                       num_classes=int(metrics["num_classes"]))


def _data_root(export_dir: Path) -> str:
    """The shard dir the run of ours that wrote `export_dir` trained on (its checkpoint records it)."""
    from train.nets.load import read_checkpoint

    ckpt = read_checkpoint(export_dir.parent / "checkpoints" / "last.ckpt")
    return str(ckpt["dataset"]["root"])


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _row(model: str, fl: dict, m: dict, seconds: float) -> list[str]:
    lat, size = m.get("latency_ms", {}), m.get("size_mb", {})

    def top1(name: str) -> str:
        return _fmt(fl.get(name, {}).get("top1"))

    def agree(name: str) -> str:
        return _fmt(fl.get(name, {}).get("agree"), ".1f")

    float_col = f"{top1('torch')} / {top1('pte')} / {top1('onnx')} / {top1('tflite')}"
    float_agree = f"{agree('pte')} / {agree('onnx')} / {agree('tflite')}"
    int8_col = " / ".join(_fmt(m.get(f"int8_{k}_top1")) for k in ("torch", "pte", "onnx", "tflite"))
    int8_agree = " / ".join(_fmt(m.get(f"int8_{k}_agreement"), ".1f") for k in ("pte", "onnx", "tflite"))
    drop = (m["int8_tflite_top1"] - m["float_top1"]) if "int8_tflite_top1" in m else None
    sizes = f"{_fmt(size.get('tflite'))} -> {_fmt(size.get('int8_tflite'))} (pte {_fmt(size.get('int8_pte'))})"
    times = " / ".join(f"{_fmt(lat.get(a))} -> {_fmt(lat.get(b))}" for a, b in (
        ("float_pte", "int8_pte"), ("onnx_1thread", "int8_onnx_1thread"), ("tflite_1thread", "int8_tflite_1thread")))
    return [model, float_col, float_agree, int8_col, _fmt(drop, "+.2f"), int8_agree, sizes, times,
            _fmt(seconds / 60, ".1f")]


HEADER = ["model", "float top-1 PyTorch / ExecuTorch / onnxruntime / LiteRT",
          "float agreement with PyTorch pte / onnx / tflite", "int8 (QAT) top-1 PyTorch / ExecuTorch / onnxruntime / "
          "LiteRT", "LiteRT int8 - float", "int8 agreement with PyTorch int8 pte / onnx / tflite",
          "MB LiteRT float -> int8 (ExecuTorch int8)", "ms/img 1 thread float -> int8: ExecuTorch / onnxruntime / "
          "LiteRT", "minutes"]


def report(rows: list[tuple[str, dict, dict, float]], args, out: Path, log: list[str]) -> str:
    lines = [f"machine: {machine_summary(__import__('torch').device('cpu'))}",
             f"Imagenette (10 classes), {args.img_size} px; top-1 on the whole val split; float {args.float_epochs} "
             f"epochs, QAT {args.qat_epochs}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    notes = []
    for model, fl, m, seconds in rows:
        lines.append("| " + " | ".join(_row(model, fl, m, seconds)) + " |")
        for key, what in (("int8_kept_float", "the quantizer kept float"),
                          ("int8_tflite_float_ops", "LiteRT int8 computes in float"),
                          ("int8_tflite_outside_xnnpack", "LiteRT int8 runs outside XNNPACK"),
                          ("tflite_outside_xnnpack", "LiteRT float runs outside XNNPACK"),
                          ("pte_outside_xnnpack", "ExecuTorch int8 runs outside XNNPACK"),
                          ("int8_failures", "failures"), ("tflite_error", "LiteRT float failed")):
            if m.get(key):
                value = m[key]
                text = ", ".join(f"{k} x{v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
                notes.append(f"- {model}: {what}: {text}")
        if "int8_decided" in m:  # exports that predate the figure have none
            notes.append(f"- {model}: on the {m['int8_decided']:.1f}% of photos the int8 model decides (top-2 logits "
                         f"two or more output steps of {m['int8_output_step']:.3g} apart), int8 agreement pte / onnx / "
                         "tflite " + " / ".join(_fmt(m.get(f"int8_{k}_agreement_decided"), ".1f")
                                                for k in ("pte", "onnx", "tflite")))
    text = "\n".join([*lines, "", *notes, "", "commands:", *log])
    out.write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--exports", nargs="+", type=Path, default=None,
                   help="QAT export dirs of ours (<run dir>/export) to measure instead of training")
    p.add_argument("--data-root", type=Path, default=None,
                   help="with --exports: the shard dir to evaluate on (default: the one each run recorded)")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--freeze-bn", type=int, default=1, help="QAT epoch from which BN statistics are frozen")
    p.add_argument("--freeze-observers", type=int, default=1, help="QAT epoch from which observers are frozen")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    exports: list[tuple[str, Path, float]] = []
    if args.exports:
        exports = [(json.loads((e / "metrics.json").read_text())["architecture"], e, float("nan"))
                   for e in args.exports]
    else:
        if not (args.src / "train").is_dir():
            raise SystemExit(f"no photos at {args.src} (need train/<class>/<image> and val/): pass --src DIR")
        root = make_splits(args.src, cache, 0.2, args.seed)["all"]
        for model in args.models:
            runs = cache / "deploy" / model
            float_dir, qat_dir = runs / "float", runs / "qat"
            fl = train_stage(f"{model} float", [f"model={model}", f"data.root={root}",
                                                f"trainer.max_epochs={args.float_epochs}", "sched.warmup_epochs=2",
                                                f"optim.lr={args.lr}", *common(args, float_dir)], float_dir, log)
            qat = train_stage(f"{model} QAT", [f"model={model}", f"data.root={root}", "qat=true",
                                               f"init_from={float_dir / 'export'}",
                                               f"trainer.max_epochs={args.qat_epochs}", f"optim.lr={args.lr}",
                                               "sched.warmup_epochs=0", f"quant.freeze_bn_epoch={args.freeze_bn}",
                                               f"quant.freeze_observer_epoch={args.freeze_observers}",
                                               *common(args, qat_dir)], qat_dir, log)
            exports.append((model, qat_dir / "export", fl["seconds"] + qat["seconds"]))
    rows = []
    for model, export_dir, seconds in exports:
        print(f"== {model}: the float network in every runtime ({export_dir})", flush=True)
        fl = float_runtimes(export_dir, args.batch_size, args.workers, args.data_root)
        rows.append((model, fl, json.loads((export_dir / "metrics.json").read_text()), seconds))
        print(report(rows, args, cache / "deploy.md", log), flush=True)


if __name__ == "__main__":
    main()
