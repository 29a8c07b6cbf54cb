"""Training images/s of our pipeline (`train.run.train(cfg)`, what `python -m train` runs) against a plain PyTorch
loop on the same model, batch size, shards and augmentation, in one run.

    python -m bench.train_step                      # mnv3_s_100, 128 px, batch 32, 40 timed steps, 3 repeats
    python -m bench.train_step --model mnv4_conv_s --img-size 224 --batch-size 256 --workers 8   # on a GPU

pipeline:   the config composed from conf/ with Hydra's compose API (export and W&B off, validation off, one
            epoch of warm-up + timed steps), run by `train.run.train(cfg)`. A timing callback is added to the
            Trainer's callbacks (`train(cfg, callbacks=[...])`); everything else is exactly the training run.
plain loop: the same `ShardDataModule` train loader (so the data and the augmentation are identical; what differs
            is the loop), `.to(device)`, normalise on the device with the pipeline's own function
            (`train.normalize.normalize_images`: the same cost on both sides), channels_last, timm AdamW
            (`create_optimizer_v2`, no weight decay on norm/bias, like the pipeline), label-smoothed cross-entropy,
            backward, step, the same timm schedule stepped per update; bf16 autocast where the pipeline uses
            bf16-mixed.

Both: warm-up steps first (worker start-up, allocator, cudnn autotuning), then images/s over the timed steps, from
the end of the last warm-up step to the end of the last timed step (device synchronised at both ends). Runs
alternate (pipeline, plain, pipeline, plain, ...); the table shows median, min and max over the repeats; the
ratio pipeline / plain loop (of the medians) is the last line.
"""

from __future__ import annotations

import argparse
import gc
import logging
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
    Runs,
    alternate,
    balanced_batches,
    bf16_mixed,
    images_needed,
    machine_summary,
    per_class_for,
    pick_device,
    prepare_slice,
    print_table,
    stop_workers,
    synchronizer,
    usable_cpus,
)
from train.builders import build_datamodule, model_data_config
from train.nets.configs import compose_config as compose_train_config
from train.nets.configs import plain

TARGET = 0.95
PREFETCH = 4  # batches per worker that ShardDataModule's loader prefetches (its default prefetch_factor)
SHUFFLE_WINDOW = 1024  # conf/data/shards.yaml; only sizes the slice (the runs use the composed config)


# --- the pipeline ----------------------------------------------------------------------------------------------


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


def compose_config(args: argparse.Namespace, shards: Path, run_dir: Path, device: torch.device):
    overrides = [
        f"model={args.model}",
        f"data.root={shards}",
        f"data.img_size={args.img_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"run_dir={run_dir}",
        "export=false",
        "logger.wandb.enabled=false",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        *args.override,
    ]
    return compose_train_config(overrides)


def run_pipeline(cfg, args: argparse.Namespace, device: torch.device) -> float:
    from train.run import train

    timer = StepTimer(args.warmup, args.steps, synchronizer(device))
    # Lightning's progress bar writes to stdout; it goes to stderr here so that stdout holds only the results.
    with redirect_stdout(sys.stderr):
        train(cfg, callbacks=[timer])
    gc.collect()  # the trainer's loader workers go with it
    return timer.images_per_second()


# --- the plain loop --------------------------------------------------------------------------------------------


def build_plain(cfg, device: torch.device):
    """Model, loader, optimizer, schedule, loss, mixing and EMA, as a careful engineer wires them by hand.

    The loader is the pipeline's own ShardDataModule, built by the same train.run helper, so the data and the
    augmentation are identical by construction.
    """
    import lightning as L
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    from data_pipes.shards.metadata import read_info
    from train.nets import create_model
    from train.optim import optimizer_factory, scheduler_factory

    if cfg.trainer.accumulate_grad_batches != 1:
        raise SystemExit("the plain loop has no gradient accumulation: keep trainer.accumulate_grad_batches=1")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    info = read_info(cfg.data.root)
    model = create_model(cfg.model.name, num_classes=info.num_classes, drop_rate=cfg.model.drop_rate,
                         drop_path_rate=cfg.model.drop_path_rate)
    data_config = model_data_config(model, cfg)
    datamodule = build_datamodule(cfg, data_config)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    # timm's create_optimizer_v2 through the pipeline's factory, for the same lr rule (one device: the global batch
    # is the batch).
    optimizer = optimizer_factory(**plain(cfg.optim), global_batch=lambda: int(cfg.data.batch_size))(model)
    scheduler = scheduler_factory(num_epochs=cfg.trainer.max_epochs, **plain(cfg.sched))(
        optimizer, datamodule.steps_per_epoch(1))
    mix = plain(cfg.aug.mixup)
    mixup = None
    if (mix["mixup_alpha"] > 0 or mix["cutmix_alpha"] > 0) and mix["prob"] > 0:
        mixup = Mixup(**mix, label_smoothing=cfg.label_smoothing, num_classes=info.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ema = ModelEmaV3(model, decay=cfg.ema.decay) if cfg.ema.decay else None
    mean = torch.tensor(data_config["mean"], device=device) * 255
    std = torch.tensor(data_config["std"], device=device) * 255
    return datamodule, model, optimizer, scheduler, mixup, criterion, ema, (mean, std, memory_format)


def run_plain(cfg, args: argparse.Namespace, device: torch.device) -> float:
    from train.nets.normalize import normalize_images

    datamodule, model, optimizer, scheduler, mixup, criterion, ema, norm = build_plain(cfg, device)
    mean, std, memory_format = norm
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_mixed(device))
    clip = cfg.trainer.gradient_clip_val
    sync = synchronizer(device)
    if datamodule.steps_per_epoch(1) < args.warmup + args.steps:
        raise SystemExit(f"the shards hold {datamodule.steps_per_epoch(1)} batches, fewer than warm-up + steps")
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    start, images = 0.0, 0
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        # The pipeline's own normalisation (train.normalize): both sides pay the same for it, so the ratio measures
        # the loop, not a faster kernel on one side.
        x = normalize_images(batch["image"].to(device, non_blocking=True), mean, std, memory_format)
        y = batch["target"].to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with autocast:
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
        if ema is not None:
            ema.update(model, step=step)
        if step >= args.warmup:
            images += x.size(0)
        if step + 1 == args.warmup:
            sync()
            start = time.perf_counter()
    sync()
    elapsed = time.perf_counter() - start
    stop_workers(loader)
    del batches, loader, datamodule
    gc.collect()
    return images / elapsed


def warn_tail(cfg, args: argparse.Namespace) -> None:
    """Says so when the timed steps reach the epoch's tail, where some loader workers have run out of windows."""
    size = {"input_size": (3, args.img_size, args.img_size), "crop_pct": 0.875, "interpolation": "bilinear"}
    stream = build_datamodule(cfg, size).train_dataloader().dataset
    balanced = balanced_batches(stream.window_batches, args.workers)
    if balanced is not None and balanced < args.warmup + args.steps:
        print(f"WARNING: the loader's workers stay evenly loaded for {balanced} batches only, fewer than warm-up + "
              f"steps ({args.warmup + args.steps}); both runners are then partly data-bound. Use a larger --src.")


def pipeline_detail(cfg) -> str:
    parts = ["Lightning"]
    parts += ["CSV logger + ThroughputLogger + LR monitor"] if cfg.logger.csv else ["no logger"]
    parts += ["progress bar"] if cfg.callbacks.progress_bar else []
    parts += [f"EMA {cfg.ema.decay}"] if cfg.ema.decay else []
    return ", ".join(parts)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnv3_s_100", help="a conf/model key (default: mnv3_s_100)")
    p.add_argument("--img-size", type=int, default=128, help="train resolution (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="per device (default: 32)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run (default: 40)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default: 10, at least 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training process, for both runners (default: on the CPU, the "
                        "usable CPUs minus the loader workers, at least 1; on a GPU, torch's default)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder (default: %(default)s)")
    p.add_argument("--upscale", type=int, default=None, metavar="PX",
                   help="re-encode the slice with this shorter side (emulates ImageNet photo sizes)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="slice and shards (default: %(default)s)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for both runners, e.g. aug=mnv4_conv_s or callbacks.progress_bar=false")
    p.add_argument("--quiet", action="store_true", help="no per-run lines, no Lightning info messages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --steps and --repeats must be at least 1")
    device = pick_device(args.device)
    torch.set_num_threads(training_threads(args.threads, args.workers, device))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING if args.quiet else logging.INFO)
    warnings.filterwarnings("ignore", message=".*(could not find the monitored key|does not have many workers).*")
    # Enough images that every loader worker has its share of the steps (see common.images_needed).
    needed = images_needed(args.warmup + args.steps + PREFETCH * args.workers, args.batch_size, args.workers,
                           SHUFFLE_WINDOW)
    data = prepare_slice(args.src, args.cache_dir, train_per_class=per_class_for(args.src, needed),
                         upscale=args.upscale, workers=max(1, args.workers))
    if data.train_images < (args.warmup + args.steps) * args.batch_size * 1.05:
        raise SystemExit(f"{args.src} has {data.train_images} train images, too few for (warm-up + steps) x batch "
                         f"size = {(args.warmup + args.steps) * args.batch_size}. Use fewer steps or a smaller batch.")
    print(f"machine: {machine_summary(device)}")
    print(f"data: {data.train_images} train images of {data.num_classes} classes from {args.src}"
          f"{f' re-encoded at {args.upscale}px' if args.upscale else ''}; shards {data.shards}")
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        cfg = compose_config(args, data.shards, Path(tmp) / "run", device)
        warn_tail(cfg, args)
        pipeline = Runs("pipeline (train.run.train)", pipeline_detail(cfg))
        plain = Runs("plain PyTorch loop", "same loader; hand-written step")
        alternate([(pipeline, lambda: run_pipeline(cfg, args, device)),
                   (plain, lambda: run_plain(cfg, args, device))], args.repeats, log)

    ratio = pipeline.median / plain.median
    precision = "bf16-mixed" if bf16_mixed(device) else "fp32"
    print_table(
        f"Training images/s: {args.model} at {args.img_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{device.type} {precision}, channels_last, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.repeats} alternating repeats",
        [pipeline, plain],
        [f"machine after: {machine_summary(device)}",
         f"target: pipeline >= {TARGET:.2f}x the plain loop -> {'met' if ratio >= TARGET else 'NOT met'}"],
    )
    print(f"ratio (pipeline / plain loop): {ratio:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
