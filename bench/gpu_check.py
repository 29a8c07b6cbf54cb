"""The paths only a GPU shows, checked in one command that prints one table and fails loudly on any mismatch.

    python -m bench.gpu_check                                  # a GPU machine: about 6 minutes on one H100
    python -m bench.gpu_check --device cpu --smoke             # every check, tiny, on the CPU (CI runs it)
    python -m bench.gpu_check --timm-train PATH/train.py       # timm's train.py (default: $TIMM_TRAIN_PY, else
                                                               # .cache/timm/train.py: `make timm-train`)

On a slice of `../shared/data/imagenette2-224` it shards itself (once, cached):
- training at full speed, bf16-mixed and channels_last, mnv3_s_100 and mnv4_conv_s, eager and compiled: images/s of
  `python -m train` (compile=true) and of timm's own `train.py` (--torchcompile) on the same shards
  (`--dataset wds/...`), same batch, workers, precision and recipe (bench.train_step's mapping);
- resume on the device: a run killed mid-epoch and one killed after an epoch's last batch (before its validation),
  each resumed, against the uninterrupted run: weights and logged losses equal (deterministic kernels);
- online distillation, `distill.build` (views/s), offline distillation from the built sets, QAT steps and an int8
  export, each on the device;
- the export's evaluation on the device against the CPU's, same weights;
- peak device memory of each.
A session with a GPU runs it and puts the table in its note; without one it has not run (say so).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import Callback

from bench.common import (
    DEFAULT_CACHE,
    DEFAULT_SRC,
    default_timm_train,
    machine_summary,
    pick_device,
    prepare_slice,
    synchronizer,
)
from bench.train_step import StepTimer, run_timm, timm_arguments
from distill.build import build as build_sets
from train.export import evaluate, export_checkpoint
from train.export.checkpoint import build_val_loader
from train.nets.configs import compose_config
from train.nets.load import Settings, load_network
from train.run import train

MODELS = {"mnv3_s_100": "mobilenetv3_small_100", "mnv4_conv_s": "mobilenetv4_conv_small"}


@dataclass(frozen=True)
class Scale:
    """How big each check runs: the GPU setting, or the CPU smoke."""

    per_class: int
    img_size: int
    batch: int
    workers: int
    warmup: int
    steps: int
    small_size: int  # resume, distillation, QAT
    small_batch: int
    compiled: tuple[str, ...]  # models whose compiled rows run (compiling is slow on a CPU)
    qat_export: bool  # the QAT check's int8 export (on a CPU, tests/test_qat_run exports int8 from a QAT run)


GPU = Scale(per_class=400, img_size=224, batch=256, workers=8, warmup=5, steps=10, small_size=128, small_batch=64,
            compiled=("mnv3_s_100", "mnv4_conv_s"), qat_export=True)
SMOKE = Scale(per_class=16, img_size=64, batch=16, workers=1, warmup=1, steps=2, small_size=32, small_batch=16,
              compiled=("mnv3_s_100",), qat_export=False)


@dataclass
class Row:
    check: str
    result: str = ""
    seconds: float = 0.0
    peak_gb: float | None = None
    ok: bool = True


@dataclass
class Checks:
    device: torch.device
    rows: list[Row] = field(default_factory=list)

    def run(self, name: str, check: Callable[[], str]) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row, start = Row(name), time.perf_counter()
        try:
            row.result = check()
        except Exception as e:  # noqa: BLE001 - every check runs; a failed one is a row that says why
            row.ok, row.result = False, f"FAILED: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(file=sys.stderr)
        row.seconds = time.perf_counter() - start
        if self.device.type == "cuda":
            row.peak_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.rows.append(row)
        print(f"[gpu_check] {name}: {row.result} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)

    def table(self) -> str:
        lines = ["| check | result | s | peak device GB |", "|---|---|---:|---:|"]
        lines += [f"| {r.check} | {r.result} | {r.seconds:.1f} | {'-' if r.peak_gb is None else f'{r.peak_gb:.2f}'} |"
                  for r in self.rows]
        return "\n".join(lines)


class KillAt(Callback):
    """A node failure after `step` optimizer steps, or (`before_validation`) when the first validation starts."""

    def __init__(self, step: int | None = None, before_validation: bool = False) -> None:
        self.step, self.before_validation = step, before_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            raise Killed(f"killed at step {trainer.global_step}")

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.before_validation and not trainer.sanity_checking:
            raise Killed(f"killed before validation at step {trainer.global_step}")


class Killed(Exception):
    pass


class Context:
    """The slice, the scratch directory and the overrides every run of the check shares."""

    def __init__(self, args: argparse.Namespace, scale: Scale, device: torch.device, tmp: Path) -> None:
        self.args, self.scale, self.device, self.tmp = args, scale, device, tmp
        self.data = prepare_slice(args.src, args.cache_dir, train_per_class=scale.per_class, val_per_class=10)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        self.common = [f"data.root={self.data.shards}", f"trainer.accelerator={accelerator}", "trainer.devices=1",
                       "trainer.precision=bf16-mixed", "logger.wandb.enabled=false", "callbacks.progress_bar=false",
                       f"data.num_workers={scale.workers}", "export_latency=false", "quant.latency=false",
                       # LiteRT converts and runs on the CPU only: no path of the device's (test_litert has it)
                       "export_tflite=false"]
        self.teacher: Path | None = None  # the export of the uninterrupted resume run: the distillation teacher
        self.uninterrupted: Path | None = None
        self.sets: Path | None = None

    def run(self, name: str, *overrides: str, callbacks=()) -> tuple[Path, dict]:
        run_dir = self.tmp / name
        cfg = compose_config([*self.common, f"run_dir={run_dir}", *overrides])
        return run_dir, train(cfg, callbacks=list(callbacks))

    def small(self, *overrides: str) -> list[str]:
        s = self.scale
        return ["model=mnv3_s_100", f"data.img_size={s.small_size}", f"data.batch_size={s.small_batch}",
                "trainer.log_every_n_steps=1", *overrides]


def speed_overrides(ctx: Context, key: str, compiled: bool) -> list[str]:
    s = ctx.scale
    return [f"model={key}", f"data.img_size={s.img_size}", f"data.batch_size={s.batch}", "trainer.max_epochs=1",
            f"trainer.limit_train_batches={s.warmup + s.steps}", "trainer.limit_val_batches=0", "export=false",
            f"compile={str(compiled).lower()}"]


def ours(ctx: Context, key: str, compiled: bool) -> str:
    s = ctx.scale
    timer = StepTimer(s.warmup, s.steps, synchronizer(ctx.device))
    ctx.run(f"speed-{key}", *speed_overrides(ctx, key, compiled), callbacks=[timer])
    return f"{timer.images_per_second():,.0f} img/s"


def timm_train(ctx: Context, key: str, compiled: bool) -> str:
    """timm's own train.py on the same shards with the arguments that mean the same config (bench.train_step)."""
    script = ctx.args.timm_train
    if script is None or not script.is_file():
        return "not run: timm's train.py not found (make timm-train, --timm-train or $TIMM_TRAIN_PY)"
    s = ctx.scale
    cfg = compose_config([*ctx.common, f"run_dir={ctx.tmp / 'timm-cfg'}", *speed_overrides(ctx, key, compiled)])
    timm_args = timm_arguments(cfg, shards=ctx.data.shards, num_classes=ctx.data.num_classes, device=ctx.device,
                               output=ctx.tmp / f"timm-{key}", compiled=compiled, ema=None, epochs=1)
    result = run_timm(script, timm_args, batch_size=s.batch, warmup=s.warmup, steps=s.steps,
                      threads=torch.get_num_threads(), device=ctx.device, tmp=ctx.tmp)
    return f"{result['images_per_second']:,.0f} img/s"


def losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def resume(ctx: Context, how: str) -> str:
    """Killed (`mid_epoch` or `epoch_end`) and resumed on the device, against the uninterrupted run."""
    # Deterministic kernels where there are any (warn where not: some CUDA backward kernels use atomics).
    same = ctx.small("trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.deterministic=warn",
                     "trainer.benchmark=false", "callbacks.checkpoint.every_n_train_steps=1", "ema.decay=0.9",
                     "aug.mixup.mixup_alpha=0.8", "model.drop_path_rate=0.1")
    if ctx.uninterrupted is None:
        ctx.uninterrupted = ctx.run("resume-uninterrupted", *same, "export=true")[0]
        ctx.teacher = ctx.uninterrupted / "export"
    kill = KillAt(step=3) if how == "mid_epoch" else KillAt(before_validation=True)
    with contextlib.suppress(Killed):
        ctx.run(f"resume-{how}", *same, "export=false", callbacks=[kill])
    run_dir, _ = ctx.run(f"resume-{how}", *same, "export=false")
    a, b = weights(ctx.uninterrupted), weights(run_dir)
    la, lb = losses(ctx.uninterrupted), losses(run_dir)
    if a.keys() != b.keys() or [s for s, _ in la] != [s for s, _ in lb]:
        raise AssertionError("the resumed run has other tensors or logged steps than the uninterrupted one")
    worst = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
                for k in a if a[k].is_floating_point() and a[k].numel())
    loss_diff = max(abs(float(x) - float(y)) / max(abs(float(x)), 1e-12) for (_, x), (_, y) in zip(la, lb))
    if worst > 1e-3 or loss_diff > 1e-3:  # atomics reorder sums by ~1e-6; a wrong resume moves weights by far more
        raise AssertionError(f"the resumed run differs from the uninterrupted one: weights by {worst:.3g}, logged "
                             f"losses by {loss_diff:.3g} (relative)")
    exact = worst == 0 and loss_diff == 0
    return (f"{'equal to' if exact else f'within {max(worst, loss_diff):.1g} of'} the uninterrupted run: "
            f"{len(a)} tensors, {len(lb)} logged losses")


def kd(ctx: Context, *overrides: str) -> list[str]:
    return ctx.small("distill=true", f"kd.teacher={ctx.teacher}", "kd.sources.d1.replicas=2",
                     "kd.sources.d2.replicas=2", f"kd.build.num_workers={ctx.scale.workers}",
                     f"kd.build.batch_size={ctx.scale.small_batch * 4}", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=4", "export=false", *overrides)


def online_kd(ctx: Context) -> str:
    _, metrics = ctx.run("kd-online", *kd(ctx))
    return f"trains: val teacher agreement {metrics['val/teacher_agree']:.1f} %"


def build(ctx: Context) -> str:
    ctx.sets = ctx.tmp / "kd-sets"
    start = time.perf_counter()
    build_sets(compose_config([*ctx.common, f"run_dir={ctx.tmp / 'build'}", *kd(ctx, f"kd.sets={ctx.sets}")]))
    views = 2 * 2 * ctx.data.train_images
    return f"{views / (time.perf_counter() - start):,.0f} views/s ({views} views)"


def offline_kd(ctx: Context) -> str:
    _, metrics = ctx.run("kd-offline", *kd(ctx, f"kd.sets={ctx.sets}"))
    return f"trains: val teacher agreement {metrics['val/teacher_agree']:.1f} %"


def qat(ctx: Context) -> str:
    export = ctx.scale.qat_export
    run_dir, metrics = ctx.run("qat", *ctx.small("qat=true", f"init_from={ctx.teacher}", "trainer.precision=32-true",
                                                 "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                                                 "quant.min_agreement.pte=0", "quant.min_agreement.onnx=0",
                                                 "quant.max_top1_drop=100", f"export={str(export).lower()}"))
    if not export:  # the CPU smoke: ExecuTorch's lowering alone takes minutes there
        return f"3 QAT steps, val top-1 {metrics['val/acc1']:.1f} (int8 export: the GPU setting)"
    return (f"int8: ExecuTorch top-1 {metrics['export/int8_pte_top1']:.1f}, onnxruntime "
            f"{metrics['export/int8_onnx_top1']:.1f} (float {metrics['export/float_top1']:.1f})")


def export_eval(ctx: Context) -> str:
    """The export's top-1 measured on the device equals the CPU's for the same weights (one image of slack)."""
    ckpt = ctx.uninterrupted / "checkpoints" / "last.ckpt"
    report = export_checkpoint(ckpt, out_dir=ctx.tmp / "reexport", device=ctx.device, num_workers=ctx.scale.workers,
                               latency=False, tflite=False)
    net = load_network(report.out_dir, settings=Settings("export"))
    loader = build_val_loader(ctx.data.shards, net.data_config, batch_size=50, num_workers=0, dct_reduce=False,
                              max_bad_fraction=0.0)
    cpu = evaluate(net.model.cpu(), loader, mean=net.data_config["mean"], std=net.data_config["std"])
    device, cpu_top1 = report.metrics["top1"], cpu["top1"]
    if abs(device - cpu_top1) > 100.0 / cpu["val_images"] + 1e-9:
        raise AssertionError(f"top-1 on {ctx.device} {device:.2f} %, on the CPU {cpu_top1:.2f} %")
    return f"top-1 {device:.2f} % on {ctx.device.type}, {cpu_top1:.2f} % on the CPU ({cpu['val_images']} images)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto: cuda when there is one")
    p.add_argument("--smoke", action="store_true", help="every check, tiny (about 4 minutes on a 2-core CPU)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--timm-train", type=Path, default=default_timm_train())
    args = p.parse_args(argv)
    device = pick_device(args.device)
    scale = SMOKE if args.smoke else GPU
    checks = Checks(device)
    print(f"machine: {machine_summary(device)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(args, scale, device, Path(tmp))
        for key in MODELS:
            for compiled in (False, True)[:1 if key not in scale.compiled else 2]:
                how = "compile=true" if compiled else "eager"
                checks.run(f"train {key}, ours ({how}, bf16, channels_last)",
                           lambda key=key, compiled=compiled: ours(ctx, key, compiled))
                checks.run(f"train {key}, timm train.py{' --torchcompile' if compiled else ''}",
                           lambda key=key, compiled=compiled: timm_train(ctx, key, compiled))
        for how in ("mid_epoch", "epoch_end"):
            checks.run(f"resume on {device.type}: killed {how.replace('_', ' ')}", lambda how=how: resume(ctx, how))
        checks.run("online distillation", lambda: online_kd(ctx))
        checks.run("distill.build", lambda: build(ctx))
        checks.run("offline distillation (built sets)", lambda: offline_kd(ctx))
        checks.run("QAT steps + int8 export", lambda: qat(ctx))
        checks.run(f"export evaluation: {device.type} vs CPU", lambda: export_eval(ctx))
    print(checks.table())
    failed = [r.check for r in checks.rows if not r.ok]
    print(f"GPU check: {'FAILED: ' + ', '.join(failed) if failed else 'every check passed'} "
          f"({'smoke, ' if args.smoke else ''}{device})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
