"""Where is int8 slower than float on this CPU, and is it the runtime or the kernels? Small networks made of one
kind of MobileNet layer, each shipped float and int8 (one PTQ calibration, our XNNPACK quantizer) to LiteRT and to
ExecuTorch, timed at batch 1 on one thread in both.

    python -m bench.int8_speed                        # about 2 minutes on 2 CPU cores
    python -m bench.int8_speed --layers depthwise     # one network

bench.deploy times whole MobileNets; when int8 is slower than float there and nothing runs outside XNNPACK or in
float, this table says which layer kind is slower in int8 on this CPU, and whether both runtimes (both on XNNPACK)
see it. Each network: a strided 3x3 stem from 3 channels, then eight layers of one kind, global average pool, a
linear classifier.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.common import machine_summary


def _stack(channels: int, stride: int, layer: Callable[[], list[nn.Module]], depth: int = 8) -> nn.Module:
    body = [m for _ in range(depth) for m in layer()]
    return nn.Sequential(nn.Conv2d(3, channels, 3, stride, 1), nn.ReLU6(), *body, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(channels, 10))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (x6) + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 6 * channels
        self.body = nn.Sequential(nn.Conv2d(channels, wide, 1), nn.ReLU6(),
                                  nn.Conv2d(wide, wide, 3, padding=1, groups=wide), nn.ReLU6(),
                                  nn.Conv2d(wide, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def networks() -> dict[str, nn.Module]:
    """Feature maps of a quarter of the input size (a MobileNet's early stages at 96 px: 24x24)."""
    return {
        "pointwise 1x1, 192 ch": _stack(192, 4, lambda: [nn.Conv2d(192, 192, 1), nn.ReLU6()]),
        "depthwise 3x3, 192 ch": _stack(192, 4, lambda: [nn.Conv2d(192, 192, 3, padding=1, groups=192), nn.ReLU6()]),
        "inverted residual, 32 ch x6": _stack(32, 4, lambda: [InvertedResidual(32)], depth=6),
        "full 3x3, 64 ch": _stack(64, 4, lambda: [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU6()]),
    }


def measure(model: nn.Module, img_size: int, tmp: Path) -> dict[str, float]:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from train.nets import litert
    from train.quant.backend import quantizer
    from train.quant.deploy import PteRunner, convert, latency_ms, write_pte, write_tflite_int8

    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(model, (torch.randn(8, 3, img_size, img_size),), dynamic_shapes=({0: batch},))
    graph = prepare_pt2e(graph.module(), quantizer("xnnpack", weight_bits=8, qat=False))
    with torch.no_grad():
        for _ in range(4):
            graph(torch.randn(8, 3, img_size, img_size))
    out = {}
    litert.write_tflite(model, tmp / "float.tflite", img_size, what="float")
    lite = write_tflite_int8(graph, tmp / "int8.tflite", img_size)
    if lite.failure:
        raise RuntimeError(lite.failure)
    out["tflite float"] = litert.latency_ms(tmp / "float.tflite", img_size, threads=1)
    out["tflite int8"] = litert.latency_ms(tmp / "int8.tflite", img_size, threads=1)
    for name, net in (("pte float", model), ("pte int8", convert(graph))):
        program = write_pte(net, tmp / f"{name}.pte", img_size)
        out[name] = latency_ms(PteRunner(tmp / f"{name}.pte", program.dynamic, img_size), img_size)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--layers", nargs="+", default=None, help="only the networks whose name starts with one of these")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    every = networks()
    chosen = {name: model for name, model in every.items()
              if args.layers is None or name.startswith(tuple(args.layers))}
    if not chosen:
        raise SystemExit(f"--layers {args.layers}: no such network; choose from {list(every)}")
    lines = [f"machine: {machine_summary(torch.device('cpu'))}", "",
             "| layers | LiteRT ms float -> int8 (int8/float) | ExecuTorch ms float -> int8 (int8/float) |",
             "|---|---|---|"]
    for name, model in chosen.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = measure(model, args.img_size, Path(tmp))
        lines.append(f"| {name} | {t['tflite float']:.3f} -> {t['tflite int8']:.3f} "
                     f"({t['tflite int8'] / t['tflite float']:.2f}x) | {t['pte float']:.3f} -> {t['pte int8']:.3f} "
                     f"({t['pte int8'] / t['pte float']:.2f}x) |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
