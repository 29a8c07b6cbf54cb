"""`python -m train.export CKPT [--out DIR] [--data-root DIR] [--ptq]`: ship a checkpoint of `python -m train`.

Exits 0 when exported, 2 on bad input (the message names the fix), 3 when a runtime (LiteRT, an int8 one) cannot take
the model or fails its threshold, or the int8 model does (the other files are still written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_pipes.errors import UserError
from train.export.checkpoint import (
    CALIB_BATCHES,
    default_device,
    default_out_dir,
    export_checkpoint,
    export_quantized,
)
from train.nets.load import is_qat_checkpoint, read_checkpoint
from train.quant.backend import PTQ_OBSERVERS


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description="Ship a checkpoint of `python -m train` (see train.export).")
    parser.add_argument("ckpt", type=Path, help="a checkpoint of `python -m train`")
    parser.add_argument("--out", type=Path, default=None,
                        help="export dir (default: <run dir>/export-<checkpoint name>, beside the run's own export)")
    parser.add_argument("--replace", action="store_true",
                        help="write into the run's own <run dir>/export, replacing it (its W&B artifact references "
                             "those files)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="shard dir to evaluate on (default: the one recorded in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's validation batch size")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader processes (default: 4, or fewer when fewer CPUs are available)")
    parser.add_argument("--device", default=default_device(),
                        help="where the evaluation runs (the ONNX check always runs on CPU)")
    parser.add_argument("--ptq", action="store_true",
                        help="also post-training int8 exports (model_int8.pte, model_int8.onnx) of a float checkpoint")
    parser.add_argument("--calib-batches", type=int, default=CALIB_BATCHES,
                        help="PTQ: training batches to calibrate on")
    parser.add_argument("--ptq-observer", choices=list(PTQ_OBSERVERS), default=None,
                        help="PTQ: how calibration sets activation ranges (default: the run's quant.ptq_observer)")
    parser.add_argument("--no-latency", dest="latency", action="store_const", const=False, default=None,
                        help="skip the batch-1 CPU latency figures (default: the run's export_latency and, for int8, "
                             "quant.latency)")
    parser.add_argument("--no-tflite", dest="tflite", action="store_const", const=False, default=None,
                        help="no LiteRT files (default: the run's export_tflite; they need the litert extra)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    int8 = None
    out = args.out if args.out is not None else default_out_dir(args.ckpt, replace=args.replace)
    try:
        if args.ptq or is_qat_checkpoint(read_checkpoint(args.ckpt)):
            report, int8 = export_quantized(args.ckpt, ptq=args.ptq, calib_batches=args.calib_batches,
                                            out_dir=out, data_root=args.data_root, batch_size=args.batch_size,
                                            num_workers=args.num_workers, latency=args.latency,
                                            ptq_observer=args.ptq_observer, tflite=args.tflite)
        else:
            report = export_checkpoint(args.ckpt, out_dir=out, data_root=args.data_root,
                                       batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                       latency=args.latency, tflite=args.tflite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = report.metrics
    print(f"exported {m['architecture']} to {report.out_dir}: top1 {m['top1']:.2f}% top5 {m['top5']:.2f}% on "
          f"{m['val_images']} val images; ONNX max |logit difference| {m['onnx_max_abs_diff']:.3g} "
          f"(bound {report.onnx_bound:.3g})")
    if "tflite_top1" in m:
        print(f"LiteRT model.tflite: top1 {m['tflite_top1']:.2f}% (agreement {m['tflite_agreement']:.2f}%, max |logit "
              f"difference| {m['tflite_max_abs_diff']:.3g})")
    failed = bool(m.get("tflite_error"))
    if failed:
        print(f"error: {m['tflite_error']}", file=sys.stderr)
    if int8 is not None:
        m = int8.metrics
        print(f"int8: ExecuTorch top1 {m['int8_pte_top1']:.2f}% (agreement {m['int8_pte_agreement']:.1f}%), "
              f"onnxruntime top1 {m['int8_onnx_top1']:.2f}% (agreement {m['int8_onnx_agreement']:.1f}%), "
              f"float {m['float_top1']:.2f}%"
              + (f", LiteRT top1 {m['int8_tflite_top1']:.2f}% (agreement {m['int8_tflite_agreement']:.1f}%)"
                 if "int8_tflite_top1" in m else ""))
        if "int8_decided" in m:  # agreement where the int8 model is not within one output step of a tie
            print(f"int8: on the {m['int8_decided']:.1f}% of val images whose int8 top-2 logits are two or more "
                  f"output steps ({m['int8_output_step']:.3g}) apart, agreement "
                  + ", ".join(f"{label} {m[f'int8_{name}_agreement_decided']:.1f}%"
                              for name, label in (("pte", "ExecuTorch"), ("onnx", "onnxruntime"), ("tflite", "LiteRT"))
                              if f"int8_{name}_agreement_decided" in m))
        for failure in int8.failures:
            print(f"error: int8 export: {failure}", file=sys.stderr)
        failed = failed or bool(int8.failures)
    return 3 if failed else 0
