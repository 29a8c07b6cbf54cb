"""Train-loader images/s: ours (`ShardDataModule.train_dataloader()`) against timm's loader on the same images,
same crop size, comparable augmentation, same worker count and batch size, in one run.

    python -m bench.loader                          # imagenette slice as stored (224x224), crop 224, 2 workers
    python -m bench.loader --upscale 500            # the slice re-encoded at 500 px (ImageNet-like photo sizes)
    python -m bench.loader --src /data/imagenet --workers 8 --batch-size 256

ours:        the shards of the slice through `ShardDataModule` exactly as train.run builds it (transforms from
             conf/aug via Hydra), each batch then moved to the device and normalised to float there (channels_last),
             as the LightningModule does, so both sides end with a normalised float batch on the device.
ours, full decode: the same with data.train_dct_reduce=false: no JPEG decoded at reduced DCT scale (how much of
             ours' lead is that shortcut; timm always decodes in full).
timm folder: `timm.data.create_dataset('', root=<slice>/train, is_training=True)` (the image files themselves).
timm wds:    `timm.data.create_dataset('wds/...', root=<shards>, split='train', is_training=True)` (the same shards:
             they carry timm's `_info.json`).
Both timm variants go through `timm.data.create_loader(..., is_training=True, use_prefetcher=True)`, which
normalises on the device. The faster timm variant is the peer.

Augmentation settings (crop size --img-size, bilinear, scale 0.08-1, ratio 3/4-4/3, flip 0.5, no colour jitter,
no random erasing):
  flip:    Inception crop + flip. Ours: aug=inception. timm: auto_augment=None, color_jitter=None.
  randaug: + RandAugment, 2 layers, magnitude 9 (std 0.5), each layer applied with p=0.5, timm's op set and ranges.
           Ours: aug=mnv3_timm with interpolation bilinear and random erasing off. timm: 'rand-m9-n2-mstd0.5'.

Each run starts fresh workers, skips --warmup batches, then times --batches batches (device synchronised at both
ends). Runs alternate (rotating the order each repeat); medians are reported, and the ratio of our median to the
faster timm median is the last line.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    DEFAULT_CACHE,
    DEFAULT_SRC,
    Runs,
    Slice,
    balanced_batches,
    cpu_seconds,
    images_needed,
    load_average,
    machine_summary,
    per_class_for,
    pick_device,
    prepare_slice,
    print_table,
    stop_workers,
    synchronizer,
    worker_pids,
)
from train.builders import build_datamodule
from train.nets.configs import compose_config as compose_train_config
from train.nets.normalize import normalize_images

GOAL = 1.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
PREFETCH = 4  # batches per worker that ShardDataModule's loader prefetches (its default prefetch_factor)


@dataclass(frozen=True)
class AugSetting:
    key: str
    title: str
    ours: tuple[str, ...]  # Hydra overrides of conf/aug
    timm_auto_augment: str | None


SETTINGS = {
    "flip": AugSetting("flip", "Inception crop + flip", ("aug=inception",), None),
    "randaug": AugSetting(
        "randaug", "Inception crop + flip + RandAugment m9 (mstd 0.5), 2 layers, p=0.5",
        ("aug=mnv3_timm", "aug.train.interpolation=bilinear", "aug.train.random_erasing=null"),
        "rand-m9-n2-mstd0.5",
    ),
}


@dataclass(frozen=True)
class Options:
    data: Slice
    img_size: int
    batch_size: int
    workers: int
    warmup: int
    batches: int
    device: torch.device
    seed: int = 0


# --- timing ----------------------------------------------------------------------------------------------------


def time_batches(loader: object, batches: Iterator, consume: Callable[[object], int],
                 opts: Options) -> tuple[float, float, float]:
    """(images/s, CPU ms per image of this process and the loader's workers, of which the workers') over
    `opts.batches` batches after `opts.warmup` untimed ones."""
    sync = synchronizer(opts.device)
    for _ in range(opts.warmup):
        consume(next(batches))
    sync()
    pids = worker_pids(loader)
    start, cpu_start, images = time.perf_counter(), cpu_seconds(pids), 0
    for _ in range(opts.batches):
        images += consume(next(batches))
    sync()
    elapsed, cpu_end = time.perf_counter() - start, cpu_seconds(pids)
    main_ms, worker_ms = (1000 * (end - begin) / images for begin, end in zip(cpu_start, cpu_end))
    return images / elapsed, main_ms + worker_ms, worker_ms


# --- ours ------------------------------------------------------------------------------------------------------


def compose_config(overrides: list[str]):
    """The run config `python -m train` composes with these overrides (no run directory: nothing is written)."""
    return compose_train_config(["run_dir=unused", *overrides])


def our_datamodule(setting: AugSetting, opts: Options, *, dct_reduce: bool = True):
    """The ShardDataModule a run builds for this config (train.builders, the transforms of conf/aug);
    `dct_reduce=False` turns off the DCT-reduced decode of large crop boxes (data.train_dct_reduce)."""
    cfg = compose_config([f"data.root={opts.data.shards}", f"data.batch_size={opts.batch_size}",
                          f"data.num_workers={opts.workers}", f"seed={opts.seed}",
                          f"data.train_dct_reduce={str(dct_reduce).lower()}", *setting.ours])
    data_config = {"input_size": (3, opts.img_size, opts.img_size), "crop_pct": 0.875, "interpolation": "bilinear"}
    return build_datamodule(cfg, data_config)


_warned: set[str] = set()


def warn_tail(loader, opts: Options) -> None:
    """Says so when the timed batches reach the epoch's tail, where some of our workers have run out of windows."""
    balanced = balanced_batches(loader.dataset.window_batches, opts.workers)
    if balanced is not None and balanced < opts.warmup + opts.batches and "tail" not in _warned:
        _warned.add("tail")
        print(f"WARNING: our loader's workers stay evenly loaded for {balanced} batches only, fewer than warm-up + "
              f"timed ({opts.warmup + opts.batches}); its number is low. Use a larger --src or fewer --batches.")


def run_ours(setting: AugSetting, opts: Options, *, dct_reduce: bool = True) -> tuple[float, float, float]:
    torch.manual_seed(opts.seed)
    loader = our_datamodule(setting, opts, dct_reduce=dct_reduce).train_dataloader()
    if len(loader) < opts.warmup + opts.batches:
        raise SystemExit(f"our loader has {len(loader)} batches per epoch, fewer than --warmup + --batches")
    warn_tail(loader, opts)
    device = opts.device
    mean = torch.tensor(IMAGENET_MEAN, device=device) * 255
    std = torch.tensor(IMAGENET_STD, device=device) * 255

    def consume(batch: dict) -> int:
        # What ImageClassifier.on_after_batch_transfer does after Lightning moved the batch to the device.
        images = normalize_images(batch["image"].to(device, non_blocking=True), mean, std, torch.channels_last)
        batch["target"].to(device, non_blocking=True)
        return images.size(0)

    try:
        return time_batches(loader, iter(loader), consume, opts)
    finally:
        stop_workers(loader)
        gc.collect()


# --- timm ------------------------------------------------------------------------------------------------------


def timm_dataset(kind: str, opts: Options):
    from timm.data import create_dataset

    if kind == "folder":
        return create_dataset("", root=str(opts.data.images / "train"), is_training=True)
    return create_dataset("wds/bench", root=str(opts.data.shards), split="train", is_training=True,
                          batch_size=opts.batch_size, seed=opts.seed)


def run_timm(kind: str, setting: AugSetting, opts: Options) -> tuple[float, float, float]:
    from timm.data import create_loader

    torch.manual_seed(opts.seed)
    loader = create_loader(
        timm_dataset(kind, opts),
        input_size=(3, opts.img_size, opts.img_size),
        batch_size=opts.batch_size,
        is_training=True,
        scale=SCALE,
        ratio=RATIO,
        hflip=0.5,
        color_jitter=None,
        auto_augment=setting.timm_auto_augment,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_workers=opts.workers,
        pin_memory=opts.device.type == "cuda",
        device=opts.device,
        use_prefetcher=True,
        persistent_workers=True,
    )
    if len(loader) < opts.warmup + opts.batches:
        raise SystemExit(f"timm's {kind} loader has {len(loader)} batches per epoch, fewer than --warmup + --batches")
    batches = iter(loader)
    try:
        return time_batches(loader, batches, lambda batch: batch[0].size(0), opts)
    finally:
        batches.close()
        stop_workers(loader)
        gc.collect()


# --- main ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224, help="crop size (default: 224)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes, both sides (default: 2)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per run (default: 30)")
    p.add_argument("--warmup", type=int, default=6, help="untimed batches first (default: 6)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each runner, alternating (default: 3)")
    p.add_argument("--aug", choices=[*SETTINGS, "both"], default="both", help="augmentation setting (default: both)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda (default: auto)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder (default: %(default)s)")
    p.add_argument("--upscale", type=int, default=None, metavar="PX",
                   help="re-encode the slice as JPEGs with this shorter side, e.g. 500 (ImageNet-like sizes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of --upscale (default: 90)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="slice and shards (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.batches < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --batches and --repeats must be at least 1")
    device = pick_device(args.device)
    # Enough images that every worker of ours has its share of the batches, and timm's too (+ prefetched ones).
    shuffle_window = compose_config([]).data.shuffle_window
    needed = images_needed(args.warmup + args.batches + PREFETCH * args.workers, args.batch_size, args.workers,
                           shuffle_window)
    data = prepare_slice(args.src, args.cache_dir, train_per_class=per_class_for(args.src, needed),
                         upscale=args.upscale, quality=args.quality, workers=max(1, args.workers))
    opts = Options(data, args.img_size, args.batch_size, args.workers, args.warmup, args.batches, device)
    source = f"re-encoded at {args.upscale}px shorter side, JPEG q{args.quality}" if args.upscale else "as stored"
    print(f"machine: {machine_summary(device)}")
    print(f"data: {data.train_images} train images of {data.num_classes} classes from {args.src} ({source}); "
          f"shards {data.shards}")
    settings = list(SETTINGS.values()) if args.aug == "both" else [SETTINGS[args.aug]]
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))

    results = []
    for setting in settings:
        ours = Runs("ours (ShardDataModule)", "shards, fused decode+crop, normalise on device")
        full = Runs("ours, full decode", "the same, data.train_dct_reduce=false: every JPEG decoded at full size")
        folder = Runs("timm create_loader, folder", "image files, PIL, prefetcher")
        wds = Runs("timm create_loader, wds", "same shards, timm ReaderWds, PIL, prefetcher")
        runners = [(ours, lambda s=setting: run_ours(s, opts)),
                   (full, lambda s=setting: run_ours(s, opts, dct_reduce=False)),
                   (folder, lambda s=setting: run_timm("folder", s, opts)),
                   (wds, lambda s=setting: run_timm("wds", s, opts))]
        log(f"{setting.title}:")
        for r in range(args.repeats):
            k = r % len(runners)
            for runs, fn in runners[k:] + runners[:k]:  # rotate the order: no runner always goes first
                value, cpu_ms, worker_ms = fn()
                runs.values.append(value)
                runs.cpu_ms.append(cpu_ms)
                runs.worker_ms.append(worker_ms)
                log(f"  repeat {r + 1}/{args.repeats}  {runs.name:<28} {value:9.1f} images/s  {cpu_ms:6.2f} CPU ms/img"
                    f" ({worker_ms:.2f} in workers)  (load avg {load_average()})")
        peer = max(folder, wds, key=lambda x: x.median)
        results.append((setting, ours, full, folder, wds, peer))

    for setting, ours, full, folder, wds, peer in results:
        ratio = ours.median / peer.median
        print_table(
            f"Train loader images/s, {setting.title}: crop {args.img_size}, batch {args.batch_size}, "
            f"{args.workers} workers, {device.type}, {args.batches} timed batches after {args.warmup}, "
            f"{args.repeats} rotating repeats",
            [ours, full, folder, wds],
            [f"peer = faster timm variant: {peer.name}; ours / peer = {ratio:.2f}x "
             f"(goal {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}); without the DCT-reduced decode "
             f"{full.median / peer.median:.2f}x"],
        )
    print(f"\nmachine after: {machine_summary(device)}")
    ratios = ", ".join(f"{ours.median / peer.median:.2f}x {setting.key} ({full.median / peer.median:.2f}x full decode)"
                       for setting, ours, full, _, _, peer in results)
    print(f"ratio (ours / faster timm): {ratios}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
