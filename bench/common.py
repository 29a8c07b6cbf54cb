"""Shared pieces of the benchmarks: the cached image slice and shards, devices, timing statistics, the table.

Data: a slice of an ImageNet-layout folder (default: the shared Imagenette photos) is made once per setting under
the cache directory (default `.cache/bench`, git-ignored): symlinks to the photos, or, with `upscale`, the photos
re-encoded as larger JPEGs (ImageNet photos are ~400x350 on average; the shared copies are 224x224), then written
as shards with `data_pipes.shards.make`. The photos themselves are never copied into the repository.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "imagenette2-224"
DEFAULT_CACHE = REPO / ".cache" / "bench"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


# --- devices ---------------------------------------------------------------------------------------------------


def default_timm_train() -> Path | None:
    """timm's train.py (not in timm's wheel or sdist): $TIMM_TRAIN_PY, else .cache/timm/train.py (`make timm-train`)."""
    for candidate in (os.environ.get("TIMM_TRAIN_PY"), REPO / ".cache" / "timm" / "train.py"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; 'cuda'/'cpu' (or 'cuda:N') as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock so that queued device work is counted."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def bf16_mixed(device: torch.device) -> bool:
    """The precision rule of train.run (`precision: auto`): bf16-mixed on a GPU that supports it."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_summary(device: torch.device) -> str:
    cpus = usable_cpus()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{stamp} | {where} | {cpus} CPUs usable | load avg (1/5/15 min) {load} | torch {torch.__version__} "
            f"| torch threads {torch.get_num_threads()}")


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


# --- data ------------------------------------------------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_needed(batches: int, batch_size: int, workers: int, shuffle_window: int) -> int:
    """Train images for our loader to deliver `batches` batches before any worker runs out of work.

    Our stream gives each worker whole shuffle windows (`data_pipes.stream.plan.fresh_streams`), so on a small
    slice some workers finish early and the last batches come from fewer workers; timing them would measure that
    tail, not the loader. This asks for enough full windows that every worker has its share of `batches`.
    """
    w = max(1, workers)
    window_batches = max(1, math.ceil(shuffle_window / batch_size))
    windows_per_worker = math.ceil(math.ceil(batches / w) / window_batches)
    return (w * windows_per_worker + 1) * window_batches * batch_size


def balanced_batches(window_batches: Sequence[int], workers: int) -> int | None:
    """Batches our loader delivers before its first worker runs out (None if the planner's API changed)."""
    try:
        from data_pipes.stream.plan import fresh_streams
    except ImportError:
        return None
    streams = fresh_streams(list(window_batches), max(1, workers))
    return min(len(s) for s in streams) * len(streams)


def per_class_for(src: Path, images_needed: int, margin: float = 1.05) -> int:
    """Train images per class so that the slice holds at least `images_needed` (plus a margin), rounded up to a
    multiple of 10 so that nearby settings share one cache entry."""
    train = src / "train"
    if not train.is_dir():
        raise SystemExit(f"--src {src}: no train/ folder (an ImageNet-layout folder has train/<class>/<image>)")
    classes = _classes(train)
    if not classes:
        raise SystemExit(f"--src {src}: train/ has no class folders")
    return 10 * math.ceil(images_needed * margin / len(classes) / 10)


@dataclass(frozen=True)
class Slice:
    """An ImageNet-layout folder of symlinks (or re-encoded copies) and its shards, both in the cache."""

    images: Path
    shards: Path
    train_images: int
    num_classes: int
    notes: list[str] = field(default_factory=list, compare=False)


def _tag(src: Path, train_per_class: int, val_per_class: int, upscale: int | None, quality: int) -> str:
    key = f"{src.resolve()}|{train_per_class}|{val_per_class}|{upscale}|{quality}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    size = f"up{upscale}q{quality}" if upscale else "orig"
    return f"{src.name}-{train_per_class}pc-{size}-{digest}"


def _reencode(job: tuple[str, str, int, int]) -> None:
    from PIL import Image

    src, dst, short, quality = job
    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = short / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.resize(size, Image.Resampling.BICUBIC).save(dst, "JPEG", quality=quality)


def _fill_split(src_split: Path, dst_split: Path, per_class: int, upscale: int | None, quality: int,
                jobs: list) -> int:
    count = 0
    for name in _classes(src_split):
        files = _images(src_split / name)[:per_class]
        folder = dst_split / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            if upscale:
                jobs.append((str(f), str(folder / (f.stem + ".JPEG")), upscale, quality))
            else:
                (folder / f.name).symlink_to(f.resolve())
        count += len(files)
    return count


def prepare_slice(src: Path, cache: Path, *, train_per_class: int, val_per_class: int = 10,
                  upscale: int | None = None, quality: int = 90, workers: int = 2) -> Slice:
    """The slice folder and its shards, made once per setting (a second call finds them in the cache)."""
    src = Path(src).expanduser()
    if not (src / "train").is_dir():
        raise SystemExit(f"no images at {src} (need {src}/train/<class>/<image>); pass --src DIR")
    tag = _tag(src, train_per_class, val_per_class, upscale, quality)
    images, shards = cache / f"{tag}-images", cache / f"{tag}-shards"
    done = images / ".done"
    if not done.is_file():
        shutil.rmtree(images, ignore_errors=True)
        jobs: list = []
        train_count = _fill_split(src / "train", images / "train", train_per_class, upscale, quality, jobs)
        if (src / "val").is_dir():
            _fill_split(src / "val", images / "val", val_per_class, upscale, quality, jobs)
        if jobs:
            print(f"re-encoding {len(jobs)} images at {upscale}px shorter side (JPEG q{quality}) into {images}",
                  flush=True)
            with ProcessPoolExecutor(max(1, workers)) as pool:
                list(pool.map(_reencode, jobs, chunksize=16))
        done.write_text(str(train_count))
    train_count = int(done.read_text())
    if not (shards / "_info.json").is_file():
        from data_pipes.shards.make import make_shards

        shutil.rmtree(shards, ignore_errors=True)
        # Several shards per loader worker, so that timm's WebDataset reader can split them between workers.
        per_shard = max(8, math.ceil(train_count / 32))
        make_shards(images, shards, samples_per_shard=per_shard, workers=max(1, workers), progress=False,
                    log=lambda *_: None)
    return Slice(images, shards, train_count, len(_classes(images / "train")))


# --- loaders ---------------------------------------------------------------------------------------------------


def stop_workers(loader: object) -> None:
    """Shut down a DataLoader's (persistent) worker processes now instead of at garbage collection."""
    inner = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader
    iterator = getattr(inner, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        inner._iterator = None


def worker_pids(loader: object) -> list[int]:
    inner = getattr(loader, "loader", loader)
    iterator = getattr(inner, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", []) if w.pid is not None]


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """(CPU time of this process (all threads), CPU time of the given worker processes) used so far. Unlike
    images/s, these hardly depend on what else runs on the machine (Linux /proc; elsewhere the workers count 0)."""
    return time.process_time(), sum(_proc_cpu_seconds(pid) for pid in pids)


# --- statistics and the table ----------------------------------------------------------------------------------


@dataclass
class Runs:
    """images/s of the repeated runs of one runner."""

    name: str
    detail: str = ""
    values: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # CPU milliseconds per image (main process + workers)
    worker_ms: list[float] = field(default_factory=list)  # of which in the loader workers

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def alternate(runners: Sequence[tuple[Runs, Callable[[], float]]], repeats: int,
              log: Callable[[str], None] = print) -> None:
    """Runs every runner once per repeat, in turn (A B A B ...), recording each run's images/s."""
    for r in range(repeats):
        for runs, fn in runners:
            value = fn()
            runs.values.append(value)
            log(f"  repeat {r + 1}/{repeats}  {runs.name:<28} {value:9.1f} images/s   (load avg {load_average()})")


def print_table(title: str, runs: Iterable[Runs], footer: Sequence[str] = ()) -> None:
    runs = list(runs)
    width = max(28, *(len(r.name) for r in runs))
    print()
    print(title)
    cpu = any(r.cpu_ms for r in runs)
    header = (f"{'runner':<{width}} {'median':>9} {'min':>9} {'max':>9} {'runs':>5}"
              f"{'  CPU ms/img (workers)' if cpu else ''}  notes")
    print(header)
    print("-" * len(header))
    for r in runs:
        lo, hi = (min(r.values), max(r.values)) if r.values else (float("nan"),) * 2
        cpu_ms = (f"{statistics.median(r.cpu_ms):12.2f} ({statistics.median(r.worker_ms):5.2f})" if r.cpu_ms
                  else f"{'n/a':>20}")
        print(f"{r.name:<{width}} {r.median:9.1f} {lo:9.1f} {hi:9.1f} {len(r.values):5d}"
              f"{cpu_ms if cpu else ''}  {r.detail}")
    for line in footer:
        print(line)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
