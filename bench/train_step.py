"""Training images/s of our pipeline (`train.run.train(cfg)`, what `python -m train` runs) against timm's own
`train.py` on the same shards, model, batch, workers, augmentation and precision, in one run: eager against
eager, `compile=true` against `--torchcompile`, each with EMA off and on; then top-1 after the same images seen.

    python -m bench.train_step                      # mnv3_s_100, 128 px, batch 32, 2 workers, 40 timed steps
    python -m bench.train_step --model mnv4_conv_s --img-size 224 --batch-size 256 --workers 8   # on a GPU

ours:   the config composed from conf/ with Hydra's compose API (export and W&B off, validation off for the timed
        runs), run by `train.run.train(cfg)` with a timing callback added, in a fresh process per run as timm's
        train.py runs; `compile=true` and `ema.decay` set per row.
timm:   timm's train.py, unchanged, in its own process (`bench.timm_peer`), on the same shards through timm's
        WebDataset reader (`--dataset wds/...`: our `_info.json` is the format it reads), with the arguments that
        mean the composed config: model, classes, size, batch, workers, channels_last, bf16 autocast where ours
        uses bf16-mixed, the same optimizer, lr, weight decay, schedule (stepped per update), label smoothing,
        dropout / drop-path, random-resized crop (scale, ratio, interpolation), flip, no colour jitter, Mixup/CutMix
        as configured; `--torchcompile` (inductor) and `--model-ema --model-ema-warmup` per row. Its loader is
        timm's (PIL decode, torchvision transforms), as a timm user runs it: what differs is the whole pipeline.

Both: warm-up updates first (worker start-up, compiling, allocator), then images/s over the timed updates (device
synchronised at both ends): ours from the end of the last warm-up step to the end of the last timed step, timm's
from a global optimizer-step hook after the same updates. Runs alternate (ours, timm, ours, timm ...) within each
setting; the table shows median, min and max over the repeats. A third row per mode, "the step alone", runs the same
network, optimizer and loss on one resident batch (no loader, no framework): the ceiling neither runner can pass.
EMA's share of a step: one update timed alone (ours: the fused update the EMA callback runs; timm: ModelEmaV3) over
the EMA-off step time, and, noisier, 1 - (images/s with EMA) / (images/s without). The accuracy rows train both
eagerly (no EMA) for `--accuracy-epochs` epochs on the slice and report each side's own validation top-1 of the last
epoch. Ratios are printed last.

timm's train.py is not in timm's wheel or sdist: `make timm-train` copies it from a checkout of timm
(`--timm-train PATH`, `$TIMM_TRAIN_PY`, or `.cache/timm/train.py`). Without it, only our rows run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from bench.common import (
    DEFAULT_CACHE,
    DEFAULT_SRC,
    REPO,
    Runs,
    alternate,
    balanced_batches,
    bf16_mixed,
    default_timm_train,
    images_needed,
    machine_summary,
    per_class_for,
    pick_device,
    prepare_slice,
    print_table,
    synchronizer,
    usable_cpus,
)
from train.builders import build_datamodule
from train.nets.configs import compose_config as compose_train_config
from train.nets.configs import plain

SPEED_GOAL = 1.2  # ours / timm's train.py, eager and compiled
EMA_GOAL = 0.03  # EMA's share of a step
PREFETCH = 4  # batches per worker that ShardDataModule's loader prefetches (its default prefetch_factor)
SHUFFLE_WINDOW = 1024  # conf/data/shards.yaml; only sizes the slice (the runs use the composed config)


# --- ours ------------------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Clock at the end of the last warm-up step and of the last timed step; counts the images in between."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None]) -> None:
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.start: float | None = None
        self.end: float | None = None
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = batch_idx + 1
        if self.start is not None and self.end is None:
            self.images += batch["image"].size(0)
        if done == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif done == self.warmup + self.steps:
            self.sync()
            self.end = time.perf_counter()

    def images_per_second(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(
                "the timing callback did not see the timed steps: train.run.train(cfg, callbacks=...) no longer "
                "hands its callbacks to the Trainer"
            )
        return self.images / (self.end - self.start)


def compose_config(args: argparse.Namespace, shards: Path, run_dir: Path, device: torch.device, *extra: str):
    overrides = [
        f"model={args.model}",
        f"data.root={shards}",
        f"data.img_size={args.img_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"run_dir={run_dir}",
        "export=false",
        "logger.wandb.enabled=false",
        "callbacks.progress_bar=false",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        *args.override,
        *extra,
    ]
    return compose_train_config(overrides)


def timed_overrides(args: argparse.Namespace, compiled: bool, ema: float | None) -> list[str]:
    return ["trainer.max_epochs=1", f"trainer.limit_train_batches={args.warmup + args.steps}",
            "trainer.limit_val_batches=0", f"compile={str(compiled).lower()}", f"ema.decay={ema or 'null'}"]


def run_ours(cfg, args: argparse.Namespace, device: torch.device) -> float:
    from train.run import train

    timer = StepTimer(args.warmup, args.steps, synchronizer(device))
    # Lightning writes to stdout; it goes to stderr here so that stdout holds only the results.
    with redirect_stdout(sys.stderr):
        train(cfg, callbacks=[timer])
    gc.collect()  # the trainer's loader workers go with it
    return timer.images_per_second()


def in_own_process(kind: str, cfg, args: argparse.Namespace, device: torch.device, threads: int, tmp: Path,
                   num_classes: int) -> float:
    """Runs `kind` (ours | ceiling) in a fresh process, as timm's train.py runs: every runner starts from the same
    state (a long-lived bench process carries heap, threads and compile workers from the runs before)."""
    from omegaconf import OmegaConf

    config, out = tmp / f"{kind}.yaml", tmp / f"{kind}-result.json"
    OmegaConf.save(cfg, config)
    return run_for_result(kind, ["bench.train_step", "--child", kind, "--child-config", str(config),
                                 "--child-classes", str(num_classes), "--warmup", str(args.warmup),
                                 "--steps", str(args.steps), "--threads", str(threads), "--device", device.type,
                                 "--child-out", str(out)], out)["images_per_second"]


def run_for_result(what: str, module_args: list[str], out: Path) -> dict:
    """`python -m <module_args>` in a fresh process; the JSON it writes to `out`, or its output's tail as the error."""
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", *module_args], cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{what} exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return json.loads(out.read_text())


def child(args: argparse.Namespace) -> int:
    """One timed run in this process (the parent's `in_own_process`)."""
    from omegaconf import OmegaConf

    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cfg = OmegaConf.load(args.child_config)
    if args.child == "ours":
        value = run_ours(cfg, args, device)
    else:
        value = compute_ceiling(cfg, num_classes=args.child_classes, device=device, compiled=bool(cfg.compile),
                                warmup=args.warmup, steps=args.steps)
    args.child_out.write_text(json.dumps({"images_per_second": value}))
    return 0


# --- timm's train.py -------------------------------------------------------------------------------------------


def timm_arguments(cfg, *, shards: Path, num_classes: int, device: torch.device, output: Path, compiled: bool,
                   ema: float | None, epochs: int) -> list[str]:
    """timm train.py's arguments that mean the composed config (see the module docstring)."""
    optim, sched, aug, mix = plain(cfg.optim), plain(cfg.sched), plain(cfg.aug.train), plain(cfg.aug.mixup)
    if optim.get("lr_batch") is not None:
        raise SystemExit("optim.lr_batch scales lr with the batch; timm's train.py scales it its own way: leave it "
                         "null here")
    if any(aug.get(k) for k in ("randaugment", "autoaugment", "color_jitter", "random_erasing")):
        raise SystemExit("this bench maps the inception crop + flip (+ Mixup) recipe to timm's arguments; use "
                         "aug=inception (policy augmentations are compared by bench.loader)")
    a = ["--dataset", "wds/slice", "--data-dir", str(shards), "--train-split", "train", "--val-split", "val",
         "--model", str(cfg.model.name), "--num-classes", str(num_classes), "--img-size", str(cfg.data.img_size),
         "--batch-size", str(cfg.data.batch_size), "--workers", str(cfg.data.num_workers),
         "--epochs", str(epochs), "--seed", str(cfg.seed), "--device", device.type,
         "--output", str(output), "--experiment", "peer", "--log-interval", "50",
         "--opt", str(optim["opt"]), "--lr", str(optim["lr"]), "--weight-decay", str(optim["weight_decay"]),
         "--sched", str(sched["sched"]), "--sched-on-updates", "--warmup-epochs", str(sched["warmup_epochs"]),
         "--warmup-lr", str(sched["warmup_lr"]), "--min-lr", str(sched["min_lr"]),
         "--smoothing", str(cfg.label_smoothing), "--drop", str(cfg.model.drop_rate or 0.0),
         "--drop-path", str(cfg.model.drop_path_rate or 0.0),
         "--scale", *map(str, aug["scale"]), "--ratio", *map(str, aug["ratio"]), "--hflip", str(aug["hflip"]),
         "--train-interpolation", str(aug["interpolation"]), "--color-jitter", "0", "--reprob", "0",
         "--mixup", str(mix["mixup_alpha"]), "--cutmix", str(mix["cutmix_alpha"]),
         "--mixup-prob", str(mix["prob"]), "--mixup-switch-prob", str(mix["switch_prob"])]
    if "betas" in optim:
        a += ["--opt-betas", *map(str, optim["betas"])]
    if "eps" in optim:
        a += ["--opt-eps", str(optim["eps"])]
    if cfg.channels_last:
        a.append("--channels-last")
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16") or (precision == "auto" and bf16_mixed(device)):
        a += ["--amp", "--amp-dtype", "bfloat16"]
    if device.type == "cuda":
        a.append("--pin-mem")
    if compiled:
        a += ["--torchcompile", "inductor"]
        if cfg.compile_mode != "default":
            a += ["--torchcompile-mode", str(cfg.compile_mode)]
    if ema:
        a += ["--model-ema", "--model-ema-decay", str(ema), *(["--model-ema-warmup"] if cfg.ema.warmup else [])]
    return a


def run_timm(script: Path, timm_args: list[str], *, batch_size: int, warmup: int, steps: int, threads: int,
             device: torch.device, tmp: Path) -> dict:
    out = tmp / "timm-result.json"
    return run_for_result("timm's train.py", [
        "bench.timm_peer", "--script", str(script), "--batch-size", str(batch_size), "--warmup", str(warmup),
        "--steps", str(steps), "--threads", str(threads), "--device", device.type, "--out", str(out), "--",
        *timm_args], out)


def ema_update_ms(cfg, *, num_classes: int, device: torch.device, decay: float, repeats: int = 100) -> dict:
    """One EMA update of the network timed alone (median over `repeats`, device synchronised): ours (`FusedEMA`, what
    the EMA callback runs after each step) and timm's `ModelEmaV3` (what train.py --model-ema runs). Far less noisy
    than the difference of two throughputs."""
    from timm.utils import ModelEmaV3

    from train.callbacks.ema import FusedEMA
    from train.nets import create_model

    model = create_model(cfg.model.name, num_classes=num_classes).to(device=device, memory_format=torch.channels_last)
    ours, theirs = FusedEMA(model, device=None, decay=decay, warmup=True), ModelEmaV3(model, decay=decay,
                                                                                        use_warmup=True)
    sync = synchronizer(device)
    times: dict[str, list[float]] = {"ours": [], "timm": []}
    for step in range(repeats + 10):
        for who, update in (("ours", lambda: ours.update_parameters(model)),
                            ("timm", lambda step=step: theirs.update(model, step=step))):
            sync()
            start = time.perf_counter()
            update()
            sync()
            if step >= 10:
                times[who].append(1e3 * (time.perf_counter() - start))
    return {who: statistics.median(values) for who, values in times.items()}


def compute_ceiling(cfg, *, num_classes: int, device: torch.device, compiled: bool, warmup: int, steps: int) -> float:
    """images/s of the step alone: the same network, optimizer and loss on one batch already on the device, normalised
    and channels_last (no loader, no framework): what neither runner can exceed, so how much of a step is left to
    win by the loop and the data path."""
    from timm.optim import create_optimizer_v2

    from train.nets import create_model

    model = create_model(cfg.model.name, num_classes=num_classes, drop_rate=cfg.model.drop_rate,
                         drop_path_rate=cfg.model.drop_path_rate)
    model = model.to(device=device, memory_format=torch.channels_last).train()
    if compiled:
        model.compile(mode=str(cfg.compile_mode))
    optim = plain(cfg.optim)
    optimizer = create_optimizer_v2(model, opt=optim["opt"], lr=optim["lr"], weight_decay=optim["weight_decay"])
    size, batch = int(cfg.data.img_size), int(cfg.data.batch_size)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_mixed(device))
    sync = synchronizer(device)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        with autocast:
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def timm_top1(output: Path) -> float:
    """The last epoch's validation top-1 from timm train.py's summary.csv."""
    with open(output / "peer" / "summary.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["eval_top1"])


# --- main ------------------------------------------------------------------------------------------------------


def training_threads(requested: int | None, workers: int, device: torch.device) -> int:
    """On the CPU, torch's default (one thread per core) plus the loader workers oversubscribes the cores; with
    other load on the machine its OpenMP threads then wait for each other at every op and a step can take 20x
    longer (seen on a 2-core machine). Both runners use the same setting, so the comparison stays fair."""
    if requested:
        return requested
    if device.type == "cuda":
        return torch.get_num_threads()
    return max(1, usable_cpus() - workers)


def warn_tail(cfg, args: argparse.Namespace) -> None:
    """Says so when the timed steps reach the epoch's tail, where some loader workers have run out of windows."""
    size = {"input_size": (3, args.img_size, args.img_size), "crop_pct": 0.875, "interpolation": "bilinear"}
    stream = build_datamodule(cfg, size).train_dataloader().dataset
    balanced = balanced_batches(stream.window_batches, args.workers)
    if balanced is not None and balanced < args.warmup + args.steps:
        print(f"WARNING: the loader's workers stay evenly loaded for {balanced} batches only, fewer than warm-up + "
              f"steps ({args.warmup + args.steps}); both runners are then partly data-bound. Use a larger --src.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnv3_s_100", help="a conf/model key (default: mnv3_s_100)")
    p.add_argument("--img-size", type=int, default=128, help="train resolution (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="per device (default: 32)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run (default: 40)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default: 10, at least 1)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    p.add_argument("--ema", type=float, default=0.9998, help="EMA decay of the EMA rows (default: 0.9998)")
    p.add_argument("--compiled", choices=("both", "eager", "compiled"), default="both",
                   help="which rows: eager, compiled or both (default: both)")
    p.add_argument("--accuracy-epochs", type=int, default=4,
                   help="epochs of the top-1 comparison on the slice, eager, no EMA (0: skip; default: 4)")
    p.add_argument("--accuracy-seeds", type=int, default=1,
                   help="seeds of the top-1 comparison, 42 onwards; the mean is compared (default: 1)")
    p.add_argument("--skip-speed", action="store_true", help="only the top-1 comparison")
    p.add_argument("--timm-train", type=Path, default=default_timm_train(),
                   help="timm's train.py (default: $TIMM_TRAIN_PY, else .cache/timm/train.py; `make timm-train`)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training process, for both runners (default: on the CPU, the "
                        "usable CPUs minus the loader workers, at least 1; on a GPU, torch's default)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder (default: %(default)s)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="train images per class of the slice (default: what the timed steps need)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="slice and shards (default: %(default)s)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for both runners (mapped to timm's arguments), e.g. optim.lr=1e-3")
    p.add_argument("--quiet", action="store_true", help="no per-run lines, no Lightning info messages")
    # One timed run in a fresh process (used by the bench itself; each runner runs in its own process).
    p.add_argument("--child", choices=("ours", "ceiling"), help=argparse.SUPPRESS)
    p.add_argument("--child-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-classes", type=int, help=argparse.SUPPRESS)
    return p


def ratio_line(name: str, a: Runs | None, b: Runs | None) -> tuple[str, float | None]:
    if a is None or b is None or not a.values or not b.values:
        return f"{name}: n/a", None
    value = a.median / b.median
    return f"{name}: {value:.2f}x", value


def measure_speed(args, data, device, threads: int, script: Path | None, tmp: Path, modes, log) -> dict:
    """Every setting's rows, ours and timm's alternating: {(who, compiled, ema): Runs}."""
    rows: dict[tuple[str, bool, float | None], Runs] = {}
    for compiled, ema in [(compiled, ema) for compiled in modes for ema in (None, args.ema)]:
        label = f"{'compiled' if compiled else 'eager'}, EMA {'on' if ema else 'off'}"
        cfg = compose_config(args, data.shards, tmp / "run", device, *timed_overrides(args, compiled, ema))
        ours = rows["ours", compiled, ema] = Runs(f"ours, {label}",
                                                  "train.run.train" + (" compile=true" if compiled else ""))
        runners = [(ours, lambda cfg=cfg: in_own_process("ours", cfg, args, device, threads, tmp, data.num_classes))]
        if script is not None:
            timm_args = timm_arguments(cfg, shards=data.shards, num_classes=data.num_classes, device=device,
                                       output=tmp / "timm", compiled=compiled, ema=ema, epochs=1)
            theirs = rows["timm", compiled, ema] = Runs(f"timm train.py, {label}",
                                                        "--torchcompile" if compiled else "")
            runners.append((theirs, lambda a=timm_args: run_timm(
                script, a, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, threads=threads,
                device=device, tmp=tmp)["images_per_second"]))
        if ema is None:
            ceiling = rows["ceiling", compiled, ema] = Runs(
                f"the step alone, {'compiled' if compiled else 'eager'}", "resident batch, no loader or framework")
            runners.append((ceiling, lambda cfg=cfg: in_own_process("ceiling", cfg, args, device, threads, tmp,
                                                                   data.num_classes)))
        alternate(runners, args.repeats, log)
    return rows


def ema_lines(rows: dict, args, cfg, data, device) -> tuple[list[str], list[str]]:
    """EMA's share of a step from the update timed alone, against the EMA-off step of each row's mode."""
    ema = ema_update_ms(cfg, num_classes=data.num_classes, device=device, decay=args.ema)
    lines, goals = [], []
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        for who in ("ours", "timm"):
            off = rows.get((who, compiled, None))
            if off is not None and off.values:
                step_ms = 1e3 * args.batch_size / off.median
                share = ema[who] / step_ms
                lines.append(f"EMA update alone, {who}: {ema[who]:.2f} ms = {100 * share:.1f} % of the {mode} step "
                             f"({step_ms:.1f} ms)")
                if who == "ours":
                    goals.append(f"EMA <= {100 * EMA_GOAL:.0f} % of the {mode} step (timed alone) -> "
                                 f"{'met' if share <= EMA_GOAL else 'NOT met'} ({100 * share:.1f} %)")
    return lines, goals


def measure_accuracy(args, data, device, threads: int, script: Path | None, tmp: Path, log) -> dict[str, list]:
    """Each side's validation top-1 after `--accuracy-epochs` epochs on the slice (eager, no EMA), once per seed."""
    from train.run import train

    epochs = args.accuracy_epochs
    accuracy: dict[str, list[float]] = {"ours": [], "timm": []} if script is not None else {"ours": []}
    for seed in range(42, 42 + args.accuracy_seeds):
        extra = [f"trainer.max_epochs={epochs}", "sched.warmup_epochs=1", "ema.decay=null", "compile=false",
                 f"seed={seed}"]
        cfg = compose_config(args, data.shards, tmp / f"accuracy-{seed}", device, *extra)
        with redirect_stdout(sys.stderr):
            accuracy["ours"].append(train(cfg)["val/acc1"])
        log(f"  top-1 after {epochs} epochs, seed {seed}: ours {accuracy['ours'][-1]:.2f}")
        if script is not None:
            timm_args = timm_arguments(cfg, shards=data.shards, num_classes=data.num_classes, device=device,
                                       output=tmp / f"timm-accuracy-{seed}", compiled=False, ema=None, epochs=epochs)
            run_timm(script, timm_args, batch_size=args.batch_size, warmup=0, steps=0, threads=threads,
                     device=device, tmp=tmp)
            accuracy["timm"].append(timm_top1(tmp / f"timm-accuracy-{seed}"))
            log(f"  top-1 after {epochs} epochs, seed {seed}: timm train.py {accuracy['timm'][-1]:.2f}")
    return accuracy


def ratios(rows: dict, modes, ema_decay: float) -> tuple[list[str], list[str]]:
    """The ratio lines and the goals they meet or not."""
    lines: list[str] = []
    goals: list[str] = []
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        for ema in (None, ema_decay):
            line, value = ratio_line(f"ours / timm train.py, {mode}, EMA {'on' if ema else 'off'}",
                                     rows.get(("ours", compiled, ema)), rows.get(("timm", compiled, ema)))
            lines.append(line)
            if value is not None:
                goals.append(f"{mode}, EMA {'on' if ema else 'off'}: ours >= {SPEED_GOAL}x timm -> "
                             f"{'met' if value >= SPEED_GOAL else 'NOT met'}")
        for who in ("ours", "timm"):
            on, off = rows.get((who, compiled, ema_decay)), rows.get((who, compiled, None))
            if on is not None and off is not None:
                share = 1.0 - on.median / off.median
                lines.append(f"EMA's share of a step from the throughputs, {who}, {mode}: {100 * share:.1f} % "
                             f"(the difference of two medians: noisy)")
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        for who in ("ours", "timm"):
            line, _ = ratio_line(f"{who} / the step alone, {mode}, EMA off", rows.get((who, compiled, None)),
                                 rows.get(("ceiling", compiled, None)))
            lines.append(line)
    if len(modes) == 2:
        for who in ("ours", "timm"):
            for ema in (None, ema_decay):
                line, value = ratio_line(f"compiled / eager, {who}, EMA {'on' if ema else 'off'}",
                                         rows.get((who, True, ema)), rows.get((who, False, ema)))
                lines.append(line)
                if who == "ours" and value is not None:
                    goals.append(f"compiled >= eager (ours, EMA {'on' if ema else 'off'}) -> "
                                 f"{'met' if value >= 1.0 else 'NOT met'}")
    return lines, goals


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child(args)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.accuracy_epochs < 0 or args.accuracy_seeds < 1:
        raise SystemExit("--warmup, --steps, --repeats and --accuracy-seeds must be at least 1, --accuracy-epochs at "
                         "least 0")
    device = pick_device(args.device)
    threads = training_threads(args.threads, args.workers, device)
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING if args.quiet else logging.INFO)
    warnings.filterwarnings("ignore", message=".*(could not find the monitored key|does not have many workers).*")
    # Enough images that every loader worker has its share of the steps (see common.images_needed).
    needed = images_needed(args.warmup + args.steps + PREFETCH * args.workers, args.batch_size, args.workers,
                           SHUFFLE_WINDOW)
    per_class = args.train_per_class or per_class_for(args.src, needed)
    data = prepare_slice(args.src, args.cache_dir, train_per_class=per_class, val_per_class=max(10, per_class // 4),
                         workers=max(1, args.workers))
    if data.train_images < (args.warmup + args.steps) * args.batch_size * 1.05:
        raise SystemExit(f"{args.src} has {data.train_images} train images, too few for (warm-up + steps) x batch "
                         f"size = {(args.warmup + args.steps) * args.batch_size}. Use fewer steps or a smaller batch.")
    script = args.timm_train if args.timm_train is not None and args.timm_train.is_file() else None
    print(f"machine: {machine_summary(device)}")
    print(f"data: {data.train_images} train images of {data.num_classes} classes from {args.src}; shards "
          f"{data.shards}")
    print(f"timm's train.py: {script or 'not found (make timm-train, --timm-train or $TIMM_TRAIN_PY): our rows only'}")
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compiled]

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp_name:
        tmp = Path(tmp_name)
        base = compose_config(args, data.shards, tmp / "run", device)
        warn_tail(base, args)
        rows = {} if args.skip_speed else measure_speed(args, data, device, threads, script, tmp, modes, log)
        ema_text, ema_goals = ([], []) if args.skip_speed else ema_lines(rows, args, base, data, device)
        accuracy = measure_accuracy(args, data, device, threads, script, tmp, log) if args.accuracy_epochs else {}

    lines, goals = ratios(rows, modes, args.ema)
    lines, goals = [*lines, *ema_text], [*goals, *ema_goals]
    if accuracy:
        images_seen = args.accuracy_epochs * (data.train_images // args.batch_size) * args.batch_size
        mean = {who: statistics.mean(values) for who, values in accuracy.items()}
        top1 = ", ".join(f"{who} {mean[who]:.2f} % ({' / '.join(f'{v:.2f}' for v in values)})"
                         for who, values in accuracy.items())
        lines.insert(0, f"top-1 after {images_seen:,} images ({args.accuracy_epochs} epochs, eager, no EMA, each "
                        f"side's own validation of the slice's val split; mean of seeds 42..{41 + args.accuracy_seeds})"
                        f": {top1}")
        if "timm" in accuracy:
            goals.append(f"top-1 ours >= timm (seed mean) -> {'met' if mean['ours'] >= mean['timm'] else 'NOT met'} "
                         f"({mean['ours'] - mean['timm']:+.2f} points)")
    precision = "bf16-mixed" if bf16_mixed(device) else "fp32"
    footer = [f"machine after: {machine_summary(device)}", *[f"goal: {g}" for g in goals]]
    if rows:
        print_table(
            f"Training images/s: {args.model} at {args.img_size}px, batch {args.batch_size}, {args.workers} workers, "
            f"{device.type} {precision}, channels_last, {args.steps} timed steps after {args.warmup} warm-up, "
            f"{args.repeats} alternating repeats, EMA {args.ema}", list(rows.values()), footer)
    else:
        print("\n".join(["", *footer]))
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
