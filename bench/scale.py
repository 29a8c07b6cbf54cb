"""`python -m bench.scale`: every data stage's cost as the data grows to ImageNet's size, and what the full ImageNet
recipe would take.

    python -m bench.scale                          # 1 %, 10 % and 100 % of ImageNet-1k's 1,281,167 train images
    python -m bench.scale --sizes 0.01 0.1         # quicker
    python -m bench.scale --stages make loader     # some stages (make, loader, d3, kdloader, build)

Data: ImageNet-shaped and synthetic, made once per size under --cache: 1000 classes, size x 1,281,167 train and
size x 50,000 val images, 1,281 a shard (ImageNet's ~1,000 shards at 100 %), small JPEGs (shorter side 32-48 px)
with ImageNet's spread of aspect ratios. Small images keep the 100 % size within an hour on 2 cores; every figure
is per item, so the growth between sizes is what it shows, not the absolute speed of decoding real photos (for that:
bench.loader on real photos).

Each stage runs in a fresh process; the parent samples every process of its tree every 0.2 s (peak resident memory
from the kernel's VmHWM, open descriptors), so "main" is the stage's own process and "worker" the largest of its
loader or pool workers.

  make      `data_pipes.shards.make`: scan + plan (a dry run), then the whole make (scan, plan, write).
  loader    the labels-only train loader of rank 0 of 8 (2 workers, batch 256, crop 64): process start to first
            batch; steady images/s over 120 batches of one rank of 1 (the same chunk order, 8x the batches); the
            plans of all 8 ranks (each rank's loader length and
            first window); validation planning (every window of 8 ranks over the val split); the checkpoint's data
            position (JSON bytes).
  d3        the default D3 (per_class 130,000 over 1000 classes) selected from the train split as the extra set,
            with synthetic selector scores (skewed over classes; scoring itself is a teacher forward, as in the
            build): the selection (one sort, files written), then 8 ranks opening it and planning a batch.
  kdloader  the online distillation loader of rank 0 of 8 over every block of D1 + D2 + D3 (2 workers, batch 128,
            views of 64 px, no teacher): start-up, steady views/s, descriptors and memory per worker.
  build     `distill.build` on one block of D1 and one of D3, in params and pixels storage, at the recipe's replicas
            (D1 1000, D3 10), stopped after 1,536 views (a timm mobilenetv3_small_050 with random weights as the
            teacher at 64 px): views/s, memory, bytes a view; extrapolated to a whole block and the whole recipe.

The table gives each figure at each size, its growth from the smallest to the largest size (time per item and
memory ratios), and the full recipe's cost at ImageNet size from the per-item figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "scale"
IMAGENET_TRAIN, IMAGENET_VAL, CLASSES, PER_SHARD = 1_281_167, 50_000, 1000, 1281
STAGES = ("make", "loader", "d3", "kdloader", "build")
WORLD, LOADER_BATCH, KD_BATCH, WORKERS, CROP = 8, 256, 128, 2, 64
STEADY_BATCHES = 120  # timed by the loader stage (30,720 images)
RECIPE = {"d1": 1000, "d2": 1000, "d3": 10}  # replicas (conf/kd/mnv4.yaml)
D3_PER_CLASS = 130_000
BUILD_VIEWS = 1536
# ImageNet's aspect ratios (width / height) and how common they are (~ the train set's histogram).
ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.12), (1.0, 0.10), (3 / 2, 0.12), (16 / 9, 0.04), (2 / 3, 0.04), (2.0, 0.03))


# ------------------------------------------------------------------------------------------------ data


def counts(size: float) -> tuple[int, int]:
    return round(IMAGENET_TRAIN * size), round(IMAGENET_VAL * size)


def class_name(c: int) -> str:
    return f"n{c:08d}"


def jpeg_pool(count: int = 256, seed: int = 0) -> list[bytes]:
    """Small JPEGs of ImageNet's aspect spread (shorter side 32-48 px), textured so they do not compress to nothing."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ratios, weights = zip(*ASPECTS)
    pool = []
    for _ in range(count):
        short, ratio = int(rng.integers(32, 49)), rng.choice(ratios, p=np.array(weights) / sum(weights))
        w, h = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def make_source(root: Path, size: float) -> Path:
    """The ImageNet-layout folder of one size (made once; `.complete` marks it)."""
    if (root / ".complete").is_file():
        return root
    train, val = counts(size)
    pool = jpeg_pool()
    for split, n in (("train", train), ("val", val)):
        for c in range(CLASSES):
            (root / split / class_name(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):  # images dealt to classes round-robin: ImageNet's ~1,281 a class at 100 %
            c = i % CLASSES
            path = root / split / class_name(c) / f"{class_name(c)}_{i:08d}.JPEG"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, pool[(i * 7919) % len(pool)])
            os.close(fd)
    (root / "labels.txt").write_text("".join(class_name(c) + "\n" for c in range(CLASSES)))
    (root / ".complete").write_text("ok\n")
    return root


def paths(cache: Path, size: float) -> dict[str, Path]:
    base = cache / f"{size * 100:g}pct"
    return {"base": base, "src": base / "src", "shards": base / "shards", "d3": base / "d3", "sets": base / "sets"}


# ------------------------------------------------------------------------------------------------ stages (children)


def stage_make(p: dict[str, Path]) -> dict:
    from data_pipes.shards.make import make_shards

    quiet = {"progress": False, "log": lambda _: None, "samples_per_shard": PER_SHARD, "workers": WORKERS}
    start = time.perf_counter()
    make_shards(p["src"], p["shards"], dry_run=True, **quiet)
    scan_plan = time.perf_counter() - start
    shutil.rmtree(p["shards"], ignore_errors=True)
    start = time.perf_counter()
    info = make_shards(p["src"], p["shards"], **quiet)
    total = time.perf_counter() - start
    images = sum(info.split(s).num_samples for s in info.splits)
    disk = sum(f.stat().st_size for f in p["shards"].iterdir())
    return {"images": images, "scan_plan_s": scan_plan, "make_s": total, "bytes": disk,
            "shards": len(list(p["shards"].glob("*.tar")))}


def _compose(overrides: list[str]):
    from train.nets.configs import compose_config

    return compose_config(["run_dir=unused", *overrides])


def stage_loader(p: dict[str, Path], t0: float) -> dict:
    import torch

    from data_pipes.stream.datamodule import ShardDataModule
    from data_pipes.stream.plan import WindowPlan
    from train.builders import datamodule_args

    cfg = _compose([f"data.root={p['shards']}", f"data.batch_size={LOADER_BATCH}", f"data.num_workers={WORKERS}",
                    f"data.img_size={CROP}", "model=mnv3_s_100"])
    data_config = {"input_size": (3, CROP, CROP), "crop_pct": 0.875, "interpolation": "bilinear"}
    dm = ShardDataModule(**datamodule_args(cfg, data_config))
    dm.rank, dm.world_size = 0, WORLD
    loader = dm.train_dataloader()
    batches = iter(loader)
    first = next(batches)
    startup = time.time() - t0
    done = loader.progress_after(0, 1)
    position = len(json.dumps({"format": 1, "epoch": 0, "window_batches_done": done}))
    del batches
    # Steady images/s: one rank of one reads the same chunks of 64 in the same kind of order as a rank of 8 but has 8x
    # the batches, so even 1 % has enough to time after the batches the workers prefetched while starting.
    dm.world_size = 1
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(WORKERS * 2 + 1):  # the prefetched batches (prefetch_factor 2 a worker) and the first
        next(batches)
    timed, start = min(STEADY_BATCHES, len(loader) - WORKERS * 2 - 1), time.perf_counter()
    if timed < 20:
        raise SystemExit(f"one rank has {len(loader)} batches of {LOADER_BATCH}: use a size of 0.01 or more")
    for _ in range(timed):
        next(batches)
    steady = timed * LOADER_BATCH / (time.perf_counter() - start)
    pids = [w.pid for w in getattr(batches, "_workers", [])]
    dm.world_size = WORLD
    # Every rank's plan: its loader's length and its first window, as each rank computes them at start-up.
    start = time.perf_counter()
    for rank in range(WORLD):
        dm.rank = rank
        stream = dm._stream("train", True)
        window = stream.windows(0)[0]
        stream.layout(0).runs(min(window.positions), max(window.positions) + 1)
    plans = time.perf_counter() - start
    val_n = dm.num_val_samples
    start = time.perf_counter()
    for rank in range(WORLD):
        plan = WindowPlan(val_n, WORLD, rank, dm.val_batch_size, 1024, train=False)
        for w in range(len(plan)):
            plan[w]
    val_plan = time.perf_counter() - start
    del first, torch
    return {"startup_s": startup, "images_s": steady, "position_bytes": position, "plan_8_ranks_s": plans,
            "val_plan_8_ranks_s": val_plan, "val_images": val_n, "windows": len(done), "worker_pids": pids,
            **shuffle_quality(stream.lengths)}


def shuffle_quality(lengths, batch: int = 1024, sampled: int = 64) -> dict:
    """At a per-device batch of 1024 over 8 ranks: how many shards a batch draws from, and what share of a sample's
    batch-mates share a batch with it again in the next epoch (reading in shard order: 1-2 shards and all of them;
    drawn uniformly at random: about batch / N)."""
    from data_pipes.stream.plan import EpochLayout, WindowPlan, window_size

    n = sum(lengths)

    def epoch(e: int) -> list[np.ndarray]:
        layout, out = EpochLayout(lengths, 0, e, True), []
        for rank in range(WORLD):
            plan = WindowPlan(n, WORLD, rank, batch, window_size(batch, 1024), train=True, seed=0, epoch=e)
            for w in range(len(plan)):
                positions = np.asarray(plan[w].positions)
                out += [layout.source_positions(positions[i:i + batch]) for i in range(0, len(positions), batch)]
        return out

    first, second = epoch(0), epoch(1)
    batch_of = np.full(n, -1)
    for i, b in enumerate(second):
        batch_of[b] = i
    starts = np.cumsum([0, *lengths])
    picked = first[:: max(1, len(first) // sampled)]
    shards = [len(np.unique(np.searchsorted(starts, b, side="right"))) for b in picked]
    again = []
    for b in picked:
        ids = batch_of[b][batch_of[b] >= 0]
        c = np.unique(ids, return_counts=True)[1]
        again.append((c * (c - 1)).sum() / (len(b) * (len(b) - 1)))
    return {"shards_a_batch": float(np.median(shards)), "mates_again": float(np.mean(again)),
            "mates_again_random": batch / n}


def _scores(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic selector scores: classes skewed (class c about 1 / (1 + c / 100) as common), confidences U(0, 1),
    every class predicted at least once."""
    from distill.select import SCORE_DTYPE

    rng = np.random.default_rng(seed)
    weights = 1.0 / (1.0 + np.arange(CLASSES) / 100)
    out = np.zeros(n, SCORE_DTYPE)
    out["cls"] = rng.choice(CLASSES, size=n, p=weights / weights.sum())
    out["conf"] = rng.uniform(0, 1, n).astype(np.float32)
    # A teacher of ImageNet predicts every class confidently somewhere; at 1 % of the images the skew alone would
    # leave the rarest classes empty, and D3 would then be smaller than at full size for a reason ImageNet lacks.
    first = min(n, CLASSES)
    out["cls"][:first] = np.arange(first)
    out["conf"][:first] = 1.0
    return out


def _write_scores(directory: Path, shards) -> None:
    (directory / "scores").mkdir(parents=True, exist_ok=True)
    scores = _scores(sum(n for _, n in shards))
    at = 0
    for k, (_, n) in enumerate(shards):
        np.save(directory / "scores" / f"block-{k:06d}.npy", scores[at:at + n])
        at += n


def stage_d3(p: dict[str, Path]) -> dict:
    from data_pipes.shards.metadata import read_info
    from data_pipes.stream.mixture import MixtureStream, Rendered, SourceReader
    from distill.select import select

    shards = read_info(p["shards"]).shards("train")
    shutil.rmtree(p["d3"], ignore_errors=True)
    _write_scores(p["d3"], shards)
    names = [class_name(c) for c in range(CLASSES)]
    start = time.perf_counter()
    selection = select(p["d3"], shards, label_names=names, threshold=0.3, per_class=D3_PER_CLASS,
                       identity={"threshold": 0.3, "per_class": D3_PER_CLASS})
    select_s = time.perf_counter() - start

    class Light:  # what a rank's stream holds of D3, without decoding anything
        labelled = False

        def __init__(self, reader):
            self.reader = reader

        def render(self, items):
            return [Rendered(None, -1, "", error="not rendered") for _ in items]

    start = time.perf_counter()
    for rank in range(WORLD):
        members = selection.members(shards)
        stream = MixtureStream([Light(SourceReader(members))], names=["d3"], weights=[1], batch_size=KD_BATCH,
                               batches_per_epoch=1000, seed=0, shuffle_window=1024, rank=rank, world_size=WORLD,
                               student_size=CROP, student_interpolation="bilinear", hflip=0.5)
        stream.batch_items(0, 0)
    open_s = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in (p["d3"] / "selection").iterdir())
    return {"extra_images": sum(n for _, n in shards), "members": members.count, "selected": len(members.images),
            "select_s": select_s, "open_8_ranks_s": open_s, "selection_bytes": disk}


def _kd_overrides(p: dict[str, Path], *extra: str) -> list[str]:
    return [f"data.root={p['shards']}", f"data.img_size={CROP}", "model=mnv3_s_100", "distill=true",
            f"kd.view_size={CROP}", f"kd.extra_root={p['shards']}", "kd.teacher=mobilenetv3_small_050",
            f"kd.teacher_weights={p['base'].parent / 'teacher.safetensors'}",
            f"kd.teacher_labels={p['src'] / 'labels.txt'}",
            f"kd.teacher_img_size={CROP}", *extra]


def stage_kdloader(p: dict[str, Path], t0: float) -> dict:
    from data_pipes.stream.mixture import MixtureLoader, MixtureStream, SourceReader
    from distill.select import Selection, with_selection
    from distill.sources import source_configs
    from distill.views import OnlineViews
    from train.nets.configs import plain

    cfg = _compose(_kd_overrides(p))
    kd = plain(cfg.kd)
    sources = [with_selection(s, Selection.load(p["d3"])) if s.selected else s for s in source_configs(kd, CROP)]
    views = [OnlineViews(s.recipe, SourceReader(s.members), source=s.index, seed=0, labelled=s.labelled)
             for s in sources]
    stream = MixtureStream(views, names=[s.name for s in sources], weights=[s.weight for s in sources],
                           batch_size=KD_BATCH, batches_per_epoch=10_000, seed=0, shuffle_window=1024, rank=0,
                           world_size=WORLD, student_size=CROP, student_interpolation="bilinear", hflip=0.5)
    loader = MixtureLoader(stream, num_workers=WORKERS, pin_memory=False, persistent_workers=True, prefetch_factor=2)
    batches = iter(loader)
    next(batches)
    startup = time.time() - t0
    timed, start = 20, time.perf_counter()
    for _ in range(timed):
        next(batches)
    steady = timed * KD_BATCH / (time.perf_counter() - start)
    pids = [w.pid for w in batches._workers]
    return {"startup_s": startup, "views_s": steady, "members": {s.name: s.members.count for s in sources},
            "blocks": {s.name: s.members.num_blocks for s in sources}, "worker_pids": pids}


class _Enough(Exception):
    pass


def stage_build(p: dict[str, Path], source: str, storage: str) -> dict:
    from distill import render
    from distill.build import build

    sets = p["sets"] / f"{source}-{storage}"
    shutil.rmtree(sets, ignore_errors=True)
    if source == "d3":  # the selector's scores as the d3 stage made them: the build selects, then labels a block
        (sets / "d3").mkdir(parents=True)
        shutil.copytree(p["d3"] / "scores", sets / "d3" / "scores")
    weights = {"d1": ("1", "0", "0"), "d3": ("0", "0", "1")}[source]
    cfg = _compose(_kd_overrides(
        p, f"kd.sets={sets}", f"kd.storage={storage}", "kd.build.num_workers=2", "kd.build.batch_size=128",
        "kd.build.device=cpu", *(f"kd.sources.{s}.weight={w}" for s, w in zip(("d1", "d2", "d3"), weights)),
        *([] if source == "d3" else ["kd.extra_root=null"])))
    add, seen = render.BlockWriter.add, {"views": 0, "start": None}

    def counting(self, chunk, ids, probs):
        add(self, chunk, ids, probs)
        if seen["start"] is None:  # from the first labelled chunk: the loader and the selection are ready
            seen["start"], seen["skip"] = time.perf_counter(), len(chunk["views"])
            return
        seen["views"] += len(chunk["views"])
        if seen["views"] >= BUILD_VIEWS:
            seen["members"], seen["block"] = self.members, self.block
            seen["bytes_per_view"] = _partial_bytes(self) / self.done  # this block's writer (workers take a block each)
            raise _Enough

    render.BlockWriter.add = counting
    start = time.perf_counter()
    with contextlib.suppress(_Enough):
        build(cfg)
    seconds = time.perf_counter() - seen["start"]
    return {"views": seen["views"], "views_s": seen["views"] / seconds, "block_members": seen["members"],
            "replicas": RECIPE[source], "bytes_per_view": seen["bytes_per_view"],
            "setup_s": seen["start"] - start}


def _partial_bytes(writer) -> int:
    tar = writer._tar.tell() if writer._tar is not None else 0
    return tar + writer.dtype.itemsize * writer.done


def make_teacher(path: Path) -> None:
    """A teacher with random weights (the build's cost does not depend on what it learned)."""
    if path.is_file():
        return
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=CLASSES, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def run_stage(args) -> None:
    p = paths(Path(args.cache), args.size)
    t0 = float(os.environ.get("SCALE_T0", time.time()))
    if args.stage == "make":
        out = stage_make(p)
    elif args.stage == "loader":
        out = stage_loader(p, t0)
    elif args.stage == "d3":
        out = stage_d3(p)
    elif args.stage == "kdloader":
        out = stage_kdloader(p, t0)
    else:
        source, storage = args.stage.split("-")[1:]
        out = stage_build(p, source, storage)
    print("SCALE_RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # loader workers are torn down with the process; their peaks were sampled already


# ------------------------------------------------------------------------------------------------ the parent


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _status(pid: int) -> tuple[int, int]:
    """(peak resident KB, open descriptors) of a process; (0, 0) when it is gone."""
    try:
        hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM"))
        return hwm, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0, 0


def measure(stage: str, size: float, cache: Path, timeout: float) -> dict:
    """Run one stage in a fresh process, sampling its process tree; returns its result plus memory figures."""
    env = dict(os.environ, SCALE_T0=repr(time.time()), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bench.scale", "--stage", stage, "--size", repr(size), "--cache", str(cache)]
    log = cache / f"{stage}-{size:g}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, tuple[int, int]] = {}
    deadline = time.time() + timeout
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            hwm, fds = _status(pid)
            old = peaks.get(pid, (0, 0))
            peaks[pid] = (max(old[0], hwm), max(old[1], fds))
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"stage {stage} at {size:g} ran past {timeout:.0f} s (log: {log})")
        time.sleep(0.2)
    lines = log.read_text().splitlines()
    result = next((json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("SCALE_RESULT ")), None)
    if proc.returncode != 0 or result is None:
        print("\n".join(lines[-40:]))
        raise SystemExit(f"stage {stage} at {size:g} failed (exit {proc.returncode})")
    main_kb, main_fds = peaks.get(proc.pid, (0, 0))
    workers = {pid: v for pid, v in peaks.items() if pid != proc.pid}
    result["main_mb"] = main_kb / 1024
    result["worker_mb"] = max((v[0] for v in workers.values()), default=0) / 1024
    result["worker_fds"] = max((v[1] for v in workers.values()), default=0)
    # A rank: its process and its workers (each counted at the largest worker's peak, shared pages included).
    result["rank_mb"] = result["main_mb"] + (WORKERS * result["worker_mb"] if workers else 0)
    return result


def fmt(value: float, unit: str = "") -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}{unit}"
    if abs(value) >= 1:
        return f"{value:.2f}{unit}"
    return f"{value:.3g}{unit}"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def report(results: dict[float, dict[str, dict]], sizes: list[float]) -> list[str]:
    """The table: each figure per size, its growth (last size / first), and the full ImageNet figure."""
    rows: list[tuple[str, list[float], str, str]] = []  # name, values, growth kind, full ImageNet

    def get(stage: str, key: str, fn=None) -> list[float]:
        vals = []
        for s in sizes:
            r = results.get(s, {}).get(stage)
            vals.append(float("nan") if r is None else (fn(r) if fn else float(r[key])))
        return vals

    def row(name, vals, full=""):
        rows.append((name, vals, full))

    cores = WORKERS
    if any("make" in results.get(s, {}) for s in sizes):
        per_img = get("make", "", lambda r: r["make_s"] * cores / r["images"] * 1e6)
        row("make: CPU us an image (2 workers)", per_img,
            hours(per_img[-1] * 1e-6 * (IMAGENET_TRAIN + IMAGENET_VAL)) + " a core (small JPEGs)")
        row("make: images/s a core", [1e6 / v for v in per_img])
        row("make: scan + plan us an image", get("make", "", lambda r: r["scan_plan_s"] / r["images"] * 1e6))
        row("make: main MB", get("make", "main_mb"))
        row("make: worker MB", get("make", "worker_mb"))
        row("make: shards on disk MB", get("make", "", lambda r: r["bytes"] / 2**20),
            "~140 GiB (ImageNet's JPEGs)")
    if any("loader" in results.get(s, {}) for s in sizes):
        row("loader: start-up s (process to 1st batch)", get("loader", "startup_s"))
        row("loader: images/s (2 workers)", get("loader", "images_s"))
        row("loader: rank MB (main + 2 workers)", get("loader", "rank_mb"))
        row("loader: main MB", get("loader", "main_mb"))
        row("loader: worker MB", get("loader", "worker_mb"))
        row("loader: worker descriptors", get("loader", "worker_fds"))
        row("loader: 8 ranks' plans ms", get("loader", "", lambda r: r["plan_8_ranks_s"] * 1e3))
        row("loader: val planning, 8 ranks, ms", get("loader", "", lambda r: r["val_plan_8_ranks_s"] * 1e3))
        row("loader: data position bytes", get("loader", "position_bytes"))
        row("shuffle: shards a batch of 1024 (median)", get("loader", "shards_a_batch"))
        row("shuffle: batch-mates together again next epoch", get("loader", "mates_again"))
        row("shuffle: the same, uniformly random", get("loader", "mates_again_random"))
    if any("d3" in results.get(s, {}) for s in sizes):
        row("d3: members (130,000 x 1000)", get("d3", "members"))
        row("d3: selection s", get("d3", "select_s"))
        row("d3: selection us an extra image", get("d3", "", lambda r: r["select_s"] / r["extra_images"] * 1e6))
        row("d3: selection MB (main)", get("d3", "main_mb"))
        row("d3: selection files MB", get("d3", "", lambda r: r["selection_bytes"] / 2**20))
        row("d3: 8 ranks open + plan a batch s", get("d3", "open_8_ranks_s"))
    if any("kdloader" in results.get(s, {}) for s in sizes):
        row("kd loader: start-up s", get("kdloader", "startup_s"))
        row("kd loader: views/s (2 workers)", get("kdloader", "views_s"))
        row("kd loader: rank MB (main + 2 workers)", get("kdloader", "rank_mb"))
        row("kd loader: worker MB", get("kdloader", "worker_mb"))
        row("kd loader: worker descriptors", get("kdloader", "worker_fds"))
    full_views = IMAGENET_TRAIN * (RECIPE["d1"] + RECIPE["d2"]) + D3_PER_CLASS * CLASSES * RECIPE["d3"]
    for source in ("d1", "d3"):
        for storage in ("params", "pixels"):
            stage = f"build-{source}-{storage}"
            if not any(stage in results.get(s, {}) for s in sizes):
                continue
            vps = get(stage, "views_s")
            per_view = get(stage, "bytes_per_view")
            block = get(stage, "", lambda r: r["block_members"] * r["replicas"])
            row(f"build {source} {storage}: views/s (2 workers, CPU teacher)", vps,
                f"{hours(full_views * cores / vps[-1])} core-hours, all {full_views / 1e9:.2f}B views")
            row(f"build {source} {storage}: one block at {RECIPE[source]} replicas", block,
                hours(block[-1] / vps[-1]) + " on 2 cores")
            row(f"build {source} {storage}: bytes a view", per_view,
                gib(per_view[-1] * full_views) + " for the recipe (at 64 px views)")
            row(f"build {source} {storage}: main MB", get(stage, "main_mb"))
            row(f"build {source} {storage}: worker MB", get(stage, "worker_mb"))
    names = [f"{s * 100:g} %" for s in sizes]
    width = max(len(r[0]) for r in rows)
    head = f"{'figure':<{width}} " + " ".join(f"{n:>11}" for n in names) + f" {'growth':>8}  full ImageNet"
    lines = [head, "-" * len(head)]
    for name, vals, full in rows:
        growth = vals[-1] / vals[0] if len(vals) > 1 and vals[0] and vals[0] == vals[0] else float("nan")
        lines.append(f"{name:<{width}} " + " ".join(f"{fmt(v):>11}" for v in vals) + f" {fmt(growth):>8}  {full}")
    return lines


def goals(results: dict[float, dict[str, dict]], sizes: list[float]) -> list[str]:
    lo, hi = results[sizes[0]], results[sizes[-1]]
    out = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append(f"  [{'met ' if ok else 'MISS'}] {name}: {detail}")

    if "make" in lo and "make" in hi:
        rate = hi["make"]["images"] / (hi["make"]["make_s"] * WORKERS)
        check("make >= 1,500 images/s a core", rate >= 1500, f"{rate:,.0f}")
        growth = (hi["make"]["make_s"] / hi["make"]["images"]) / (lo["make"]["make_s"] / lo["make"]["images"])
        check("make time an image, largest / smallest <= 1.25", growth <= 1.25, f"{growth:.2f}")
    if "loader" in lo and "loader" in hi:
        s = hi["loader"]["startup_s"]
        check("start-up at the largest size < 60 s", s < 60, f"{s:.1f} s")
        g = s / lo["loader"]["startup_s"]
        check("start-up, largest / smallest <= 1.5", g <= 1.5, f"{g:.2f}")
        g = lo["loader"]["images_s"] / hi["loader"]["images_s"]
        check("loader time an image, largest / smallest <= 1.25", g <= 1.25, f"{g:.2f}")
        m = hi["loader"]["rank_mb"] / lo["loader"]["rank_mb"]
        check("rank memory (2 workers), largest / smallest <= 1.25", m <= 1.25, f"{m:.2f}")
    if "kdloader" in hi:
        mb = hi["kdloader"]["rank_mb"]
        check("online distillation with the default D3: start-up memory < 4 GB a rank", mb < 4096, f"{mb:,.0f} MB")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="fractions of ImageNet-1k's train set (default 0.01 0.1 1.0)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the data of each size is kept")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a stage may take")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args)
        return 0
    cache = Path(args.cache)
    sizes = sorted(args.sizes)
    results: dict[float, dict[str, dict]] = {}
    began = time.time()
    for size in sizes:
        p = paths(cache, size)
        start = time.perf_counter()
        make_source(p["src"], size)
        make_teacher(cache / "teacher.safetensors")
        print(f"{size * 100:g} %: {sum(counts(size)):,} images in {p['src']} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        results[size] = {}
        stages = list(args.stages)
        if ("loader" in stages or "d3" in stages or "kdloader" in stages or "build" in stages) and \
                "make" not in stages and not (p["shards"] / "_info.json").is_file():
            stages.insert(0, "make")
        if ("kdloader" in stages or "build" in stages) and "d3" not in stages and \
                not (p["d3"] / "selection").is_dir():
            stages.insert(stages.index("kdloader" if "kdloader" in stages else "build"), "d3")
        for stage in stages:
            names = [f"build-{s}-{t}" for s in ("d1", "d3") for t in ("params", "pixels")] if stage == "build" \
                else [stage]
            for name in names:
                start = time.perf_counter()
                results[size][name] = measure(name, size, cache, args.timeout)
                print(f"  {name:<18} {time.perf_counter() - start:7.1f} s  {json.dumps(_brief(results[size][name]))}",
                      flush=True)
    print()
    print(f"bench.scale: {', '.join(f'{s * 100:g} %' for s in sizes)} of ImageNet-1k (1000 classes, "
          f"{PER_SHARD} images a shard, small JPEGs), {os.cpu_count()} CPUs, {(time.time() - began) / 60:.0f} min")
    for line in report(results, sizes):
        print(line)
    print("GPU hours: not measured here (no GPU on this machine); the build's teacher runs on the GPU, so its GPU "
          "hours are the views over the teacher's views/s there (bench.gpu_check); its CPU side is the rendering "
          "above.")
    print("The D3 block figures depend on the size: the default D3 is 130M members whatever the extra set, spread over "
          "its shards (about 125,000 members, 1.25M views a block on average at 100 %; the block measured is the one "
          "the first worker took, which holds the repeats of the classes whose few images sit in it).")
    if len(sizes) > 1:
        print("goals:")
        for line in goals(results, sizes):
            print(line)
    return 0


def _brief(result: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
            if k not in ("worker_pids", "members", "blocks")}


if __name__ == "__main__":
    sys.exit(main())
