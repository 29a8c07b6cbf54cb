"""Distillation throughput: building the teacher-labelled views, and the training loader that replays them, against
the labels-only loader, in one run.

    python -m bench.distill                               # imagenette slice, crop 160, teacher mnv3_l_100 at 224
    python -m bench.distill --teacher runs/teacher/export # a trained teacher of ours (the cost is the same)
    python -m bench.distill --upscale 500                 # the photos re-encoded at ImageNet-like sizes
    python -m bench.distill --device cuda --workers 8 --batch-size 256 --build-batch 512   # a GPU box

Build: `python -m distill.build`'s `build(cfg)` on D1 (RandAugment l2m9) + D2 (extreme mixup), --replicas each, in
`params` storage and again in `pixels` storage, each into a fresh directory; views/s = views / wall time of the whole
build (teacher loading and the manifest included). Bytes per view: every file the build wrote for the views (records,
checksums, tars) over the views.

Loaders (same slice, student crop, batch, workers; each batch moved to the device and normalised there, as the
LightningModule does):
  labels only  `ShardDataModule.train_dataloader()` as train.run builds it (aug=inception: Inception crop + flip)
  replay       `distill=true` with kd.sets in params storage: every view re-rendered from its stored parameters
               (decode, crop, RandAugment or a mixup of two decoded images, JPEG round-trip) + flip, teacher top-10
  pixels       the same with pixels storage: the stored view JPEG decoded + flip, teacher top-10
Each run starts fresh workers, skips --warmup batches, then times --batches batches; runs alternate, medians are
reported, the ratios against labels only are the last line (goals: replay >= 0.5x, pixels >= 0.9x).

Replay cost (last table): the views of the first --cost-batches batches re-rendered in this process (one thread,
as in a worker) through the loader's own calls, each timed (read, decode, crop, RandAugment, blend, JPEG round trip,
student resize) and checked against the loader's render, beside both loaders' end-to-end ms per image without
workers. Its last line is the bound those calls put on the replay ratio whatever else is trimmed: with every core
busy, images/s ~ cores / CPU ms per image, so replay reaches 0.5x only if its CPU ms per image (library calls + the
main process's share) is at most twice the labels-only loader's.

The teacher: --teacher PATH (an export or checkpoint of ours), or a timm name (default mobilenetv3_large_100) whose
freshly initialised weights are saved to the cache: the teacher's cost does not depend on its weights' values.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import (
    DEFAULT_CACHE,
    DEFAULT_SRC,
    Runs,
    images_needed,
    load_average,
    machine_summary,
    per_class_for,
    pick_device,
    prepare_slice,
    print_table,
    stop_workers,
)
from bench.loader import IMAGENET_MEAN, IMAGENET_STD, PREFETCH, Options, compose_config, time_batches
from data_pipes.shards.metadata import read_info
from train.builders import build_datamodule, labels_only
from train.features.distill import KnowledgeDistillation
from train.nets.normalize import normalize_images

GOALS = {"replay": 0.5, "pixels": 0.9}


def teacher_spec(args, label_names: list[str], cache: Path) -> list[str]:
    """kd overrides naming the teacher: a path of ours, or a timm name with saved fresh weights + class names."""
    if Path(args.teacher).exists():
        return [f"kd.teacher={Path(args.teacher).resolve()}"]
    import timm
    from safetensors.torch import save_file

    import train.nets  # noqa: F401 - our registered variants

    stem = cache / f"teacher-{args.teacher}-{len(label_names)}"
    weights, labels = stem.with_suffix(".safetensors"), stem.with_suffix(".txt")
    if not weights.is_file():
        torch.manual_seed(0)
        model = timm.create_model(args.teacher, num_classes=len(label_names))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        labels.write_text("\n".join(label_names) + "\n")
    return [f"kd.teacher={args.teacher}", f"kd.teacher_weights={weights}", f"kd.teacher_labels={labels}"]


def overrides(args, data, teacher: list[str], sets: Path | None, storage: str = "params") -> list[str]:
    return [f"data.root={data.shards}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
            f"data.img_size={args.img_size}", "seed=0", "distill=true", *teacher,
            f"kd.sets={sets if sets else 'null'}", f"kd.storage={storage}", f"kd.sources.d1.replicas={args.replicas}",
            f"kd.sources.d2.replicas={args.replicas}", f"kd.build.num_workers={args.workers}",
            f"kd.build.batch_size={args.build_batch}", f"kd.build.device={args.device}"]


def run_build(cfg, out: Path) -> tuple[float, int, float]:
    """(views/s, views, bytes per view) of a fresh build into `out`."""
    from distill.build import build

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build(cfg)
    elapsed = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    views = sum(c["views"] for c in manifest["counts"].values())
    files = [p for p in out.rglob("block-*") if p.is_file()]
    return views / elapsed, views, sum(p.stat().st_size for p in files) / views


def student_data_config(img_size: int) -> dict:
    return {"input_size": [3, img_size, img_size], "crop_pct": 0.875, "interpolation": "bilinear",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def labels_only_loader(cfg, img_size: int):
    return build_datamodule(cfg, student_data_config(img_size)).train_dataloader()


def distill_loader(cfg, img_size: int):
    """The train loader of a `distill=true` run of this config (the feature a run uses, on the labels-only parts)."""
    data_config, info = student_data_config(img_size), read_info(cfg.data.root)
    parts = KnowledgeDistillation.from_config(cfg).data(labels_only(cfg, info, data_config), info=info,
                                                         data_config=data_config)
    return parts.datamodule.train_dataloader()


def timed_loader(make, opts: Options) -> tuple[float, float, float]:
    torch.manual_seed(opts.seed)
    loader = make()
    if len(loader) < opts.warmup + opts.batches:
        raise SystemExit(f"a loader has {len(loader)} batches per epoch, fewer than --warmup + --batches: "
                         f"lower them or raise --per-class")
    device = opts.device
    mean, std = torch.tensor(IMAGENET_MEAN, device=device) * 255, torch.tensor(IMAGENET_STD, device=device) * 255

    def consume(batch: dict) -> int:
        images = normalize_images(batch["image"].to(device, non_blocking=True), mean, std, torch.channels_last)
        for key in ("target", "kd_ids", "kd_probs"):
            if key in batch:
                batch[key].to(device, non_blocking=True)
        return images.size(0)

    try:
        return time_batches(loader, iter(loader), consume, opts)
    finally:
        stop_workers(loader)
        gc.collect()


STEPS = ("read the source sample(s)", "decode the source JPEG(s)", "crop -> view size", "recorded flip",
         "RandAugment layers", "mixup blend", "JPEG encode (round trip)", "JPEG decode (round trip)",
         "student resize + flip")


def replay_steps(stream, batches: int) -> tuple[dict[str, float], int]:
    """Seconds spent in each library call that re-renders the stored views of `batches` batches, in this process,
    one call at a time: the loader's own functions, samples read a source at a time per batch as the loader reads
    them, and every view checked against the loader's render. One batch first warms the caches, uncounted."""
    import cv2
    import numpy as np
    import simplejpeg

    from data_pipes.image.decode import Box, load_region, open_image, resize
    from data_pipes.image.views import blend, jpeg_encode

    size, interpolation = stream.student_size, stream.student_interpolation
    flips = np.random.default_rng(0).random((batches + 1) * stream.batch_size) < stream.hflip
    spent, views, rendered = dict.fromkeys(STEPS, 0.0), 0, []

    def clock(step: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        spent[step] += time.perf_counter() - start
        return out

    def render(source, record, raw: dict, members: list[int]) -> np.ndarray:
        recipe, parts = source.recipe, []
        for part, member in zip("ab", members):
            rec, src = record[part], open_image(raw[member]["jpg"])
            arr, region = clock(STEPS[1], load_region, src, Box(*(int(v) for v in rec["box"])), recipe.size)
            rows, cols = region.pixels(arr.shape[1], arr.shape[0])
            img = clock(STEPS[2], resize, arr[rows, cols], recipe.size, recipe.size, recipe.interpolation)
            if rec["flip"]:
                img = clock(STEPS[3], cv2.flip, img, 1)
            parts.append(clock(STEPS[4], recipe.augment, img, rec))
        view = clock(STEPS[5], blend, *parts, np.float32(record["lam"])) if recipe.mixes else parts[0]
        if int(record["quality"]):
            encoded = clock(STEPS[6], jpeg_encode, view, int(record["quality"]))
            view = clock(STEPS[7], simplejpeg.decode_jpeg, encoded, "RGB")
        rendered.append((recipe, record, [raw[m]["jpg"] for m in members], view))
        return view

    for batch in [batches, *range(batches)]:
        if batch == 0:
            spent, views, rendered = dict.fromkeys(STEPS, 0.0), 0, []
        items = stream.batch_items(0, batch)
        for s, source in enumerate(stream.sources):
            located = [view_members(source, item) for item in items if item.source == s]
            raw = clock(STEPS[0], source.reader.read, [m for _, members in located for m in members])
            for record, members in located:
                student = clock(STEPS[8], resize, render(source, record, raw, members), size, size, interpolation)
                if flips[views]:
                    clock(STEPS[8], cv2.flip, student, 1)
                views += 1
    # Checked after the timing, so that rendering every view twice does not evict the one being timed from the cache.
    if any(not np.array_equal(view, recipe.render(record, *data)) for recipe, record, data, view in rendered):
        raise SystemExit("bench.distill: the step-by-step render differs from the loader's; update replay_steps")
    return spent, views


def view_members(source, item) -> tuple:
    """A stored view's record and the members it is rendered from (its image, and its mixup partner)."""
    record = source.locate(item)[-1]["view"]
    return record, [item.member, int(record["partner"])] if source.recipe.mixes else [item.member]


def print_replay_cost(steps: dict[str, float], views: int, replay_ms: float, labels_ms: float, runs: dict) -> None:
    """Where a replayed view's time goes, and the best ratio replay could reach if nothing but those calls ran."""
    per_view = {step: 1000 * s / views for step, s in steps.items()}
    total = sum(per_view.values())
    print(f"\nReplay, one process, {views} views: milliseconds per view in each library call")
    print(f"{'step':<44} {'ms/view':>8} {'share':>6}")
    print("-" * 60)
    for step, ms in per_view.items():
        print(f"{step:<44} {ms:8.3f} {ms / replay_ms:6.0%}")
    print(f"{'library calls, total':<44} {total:8.3f} {total / replay_ms:6.0%}")
    print(f"{'replay loader, end to end (no workers)':<44} {replay_ms:8.3f}   (the rest: Python between the calls, "
          f"collation)")
    print(f"{'labels-only loader, end to end (no workers)':<44} {labels_ms:8.3f}")
    # With every core busy, images/s ~ cores / CPU ms per image; the main process's share (unpickling, normalising)
    # comes from the timed runs above. Replay with no glue at all would cost its library calls + that share.
    labels_cpu = statistics.median(runs["labels"].cpu_ms)
    replay_main = statistics.median(runs["replay"].cpu_ms) - statistics.median(runs["replay"].worker_ms)
    goal = GOALS["replay"]
    print(f"bound: {goal}x needs replay at <= {labels_cpu / goal:.2f} CPU ms per image (labels only: "
          f"{labels_cpu:.2f}), i.e. <= {labels_cpu / goal - replay_main:.2f} ms per view in the workers besides the "
          f"main process's {replay_main:.2f}; these library calls alone take {total:.2f} ms, so replay tops out near "
          f"{labels_cpu / (total + replay_main):.2f}x however little else its workers do")


def replay_cost(args, opts: Options, data, teacher: list[str], params_sets: Path, runs: dict) -> None:
    """The replay cost table: loaders without workers, in this process, with one thread for torch and OpenCV as in
    a loader worker (init_loader_worker), so that the calls cost what they cost there."""
    import cv2

    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    try:
        in_process = argparse.Namespace(**{**vars(args), "workers": 0})
        replay = distill_loader(compose_config(overrides(in_process, data, teacher, params_sets)), args.img_size)
        labels = labels_only_loader(compose_config([f"data.root={data.shards}", f"data.batch_size={args.batch_size}",
                                                    "data.num_workers=0", "seed=0", "aug=inception"]), args.img_size)
        steps, views = replay_steps(replay.dataset, args.cost_batches)
        timing = replace(opts, workers=0, warmup=1, batches=args.cost_batches)
        ms = {name: 1000 / time_batches(loader, iter(loader), lambda batch: batch["image"].shape[0], timing)[0]
              for name, loader in (("replay", replay), ("labels", labels))}
        print_replay_cost(steps, views, ms["replay"], ms["labels"], runs)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=160, help="student crop (default: 160)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader and build worker processes (default: 2)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per loader run (default: 30)")
    p.add_argument("--warmup", type=int, default=6, help="untimed batches first (default: 6)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loader, alternating (default: 3)")
    p.add_argument("--replicas", type=int, default=2, help="views built per image, D1 and D2 each (default: 2)")
    p.add_argument("--teacher", default="mobilenetv3_large_100", help="export/checkpoint path, or a timm name")
    p.add_argument("--build-batch", type=int, default=128, help="views per teacher forward pass (default: 128)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout folder (default: %(default)s)")
    p.add_argument("--upscale", type=int, default=None, metavar="PX",
                   help="re-encode the slice as JPEGs with this shorter side, e.g. 500 (ImageNet-like sizes: every "
                        "loader decodes its source photos, so their size is part of what is measured)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of --upscale (default: 90)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="slice, shards, sets (default: %(default)s)")
    p.add_argument("--cost-batches", type=int, default=10,
                   help="batches of the one-process replay cost table (default: 10)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    args.device = device.type
    cache = args.cache_dir.resolve()
    shuffle_window = compose_config([]).data.shuffle_window
    needed = images_needed(args.warmup + args.batches + PREFETCH * args.workers, args.batch_size, args.workers,
                           shuffle_window)
    data = prepare_slice(args.src, cache, train_per_class=per_class_for(args.src, needed), upscale=args.upscale,
                         quality=args.quality, workers=args.workers)
    from data_pipes.shards.metadata import read_info

    teacher = teacher_spec(args, list(read_info(data.shards).label_names), cache)
    log = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    print(f"machine: {machine_summary(device)}")
    source = f"re-encoded at {args.upscale}px shorter side, JPEG q{args.quality}" if args.upscale else "as stored"
    print(f"data: {data.train_images} train images of {data.num_classes} classes ({source}; {data.shards}); teacher "
          f"{' '.join(teacher)}")

    sets = {mode: cache / f"kd-{mode}-{data.shards.name}" for mode in ("params", "pixels")}
    builds = {}
    for mode, out in sets.items():
        log(f"building {mode} sets: D1 + D2, {args.replicas} replicas each -> {out}")
        builds[mode] = run_build(compose_config(overrides(args, data, teacher, out, mode)), out)
        log(f"  {builds[mode][0]:.1f} views/s, {builds[mode][1]} views, {builds[mode][2]:.1f} bytes/view")

    opts = Options(data, args.img_size, args.batch_size, args.workers, args.warmup, args.batches, device)
    labels_cfg = compose_config([f"data.root={data.shards}", f"data.batch_size={args.batch_size}",
                                 f"data.num_workers={args.workers}", "seed=0", "aug=inception"])
    runs = {"labels": Runs("labels only (ShardDataModule)", "Inception crop + flip, decode from the shards"),
            "replay": Runs("replay (params storage)", "re-render each view from its parameters + flip"),
            "pixels": Runs("pixels storage", "decode the stored view JPEG + flip")}
    makers = {"labels": lambda: labels_only_loader(labels_cfg, args.img_size),
              "replay": lambda: distill_loader(compose_config(overrides(args, data, teacher, sets["params"])),
                                               args.img_size),
              "pixels": lambda: distill_loader(compose_config(overrides(args, data, teacher, sets["pixels"],
                                                                        "pixels")), args.img_size)}
    order = list(runs)
    for r in range(args.repeats):
        k = r % len(order)
        for key in order[k:] + order[:k]:
            value, cpu_ms, worker_ms = timed_loader(makers[key], opts)
            runs[key].values.append(value)
            runs[key].cpu_ms.append(cpu_ms)
            runs[key].worker_ms.append(worker_ms)
            log(f"  repeat {r + 1}/{args.repeats}  {runs[key].name:<30} {value:9.1f} images/s  {cpu_ms:6.2f} CPU "
                f"ms/img  (load avg {load_average()})")

    build_rows = [replace(Runs(f"build, {mode} storage", f"{views} views, {per_view:.1f} bytes/view stored"),
                          values=[rate]) for mode, (rate, views, per_view) in builds.items()]
    print_table(f"Build: teacher-labelled views/s ({args.teacher}, {device.type}, {args.workers} render workers, "
                f"teacher batch {args.build_batch}); one build each", build_rows)
    ratios = {key: runs[key].median / runs["labels"].median for key in GOALS}
    print_table(f"Train loader images/s: student crop {args.img_size}, batch {args.batch_size}, {args.workers} "
                f"workers, {device.type}, {args.batches} timed batches after {args.warmup}, {args.repeats} rotating "
                f"repeats",
                runs.values(),
                [f"{key} / labels only = {ratio:.2f}x (goal {GOALS[key]}x: "
                 f"{'met' if ratio >= GOALS[key] else 'NOT met'})" for key, ratio in ratios.items()])
    replay_cost(args, opts, data, teacher, sets["params"], runs)
    print(f"\nmachine after: {machine_summary(device)}")
    print(f"bytes per view: params {builds['params'][2]:.1f}, pixels {builds['pixels'][2]:.1f}; build views/s: params "
          f"{builds['params'][0]:.1f}, pixels {builds['pixels'][0]:.1f}")
    print("ratio (vs labels-only loader): " + ", ".join(f"{r:.2f}x {k}" for k, r in ratios.items()), flush=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
