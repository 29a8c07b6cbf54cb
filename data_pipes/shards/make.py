"""Turn an ImageNet-layout folder into WebDataset tar shards plus timm's `_info.json`.

    python -m data_pipes.shards.make --src /data/imagenet --out /data/imagenet-wds

Input: SRC/train/<class>/**/<image> and SRC/val/<class>/**/<image> (ImageFolder layout), or ImageNet's flat
SRC/val/<image> with a label file (Kaggle's LOC_val_solution.csv, found in or next to SRC; or the devkit's
ILSVRC2012_validation_ground_truth.txt with --devkit-meta meta.mat). Class index = position of the class folder
name in the sorted train class folders; those names become `label_names` in `_info.json`.

Output: OUT/train-000000.tar ..., OUT/val-000000.tar ..., one sample per image (`__key__` from the file name,
`jpg` = the file's bytes as they came, `cls` = class index), samples shuffled across classes (--seed), shards
of about --shard-bytes each, written by --workers processes. Files that cannot be read or decoded are skipped
and listed in OUT/_skipped.txt. OUT/_info.json is written last. An interrupted run resumes when the same
command is run again: finished shards are kept, only the missing ones are written.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from data_pipes.errors import UserError
from data_pipes.shards.metadata import INFO_FILE, DatasetInfo, SplitInfo, write_info
from data_pipes.shards.plan import (
    PLAN_FILE,
    SKIPPED_FILE,
    Plan,
    ShardSpec,
    append_progress,
    exclusive,
    make_plan,
    open_output,
    parse_size,
    read_plan_file,
    tar_bytes,
)
from data_pipes.shards.scan import SPLITS, Skip, Source, scan_source
from data_pipes.shards.val_labels import ShardSourceError
from data_pipes.shards.write import DEFAULT_QUALITY, VALIDATE_MODES, Recode, ShardTask, load_sample, write_shard

DEFAULT_SHARD_BYTES = 10**9
DEFAULT_SEED = 0  # the shuffle of samples across shards; part of the plan
DEFAULT_VALIDATE = "draft"
_RATIO_SAMPLE = 64  # images re-encoded up front to predict shard bytes when resizing
_SHOW_SKIPPED = 5


def default_workers() -> int:
    """CPUs this process may use (respects SLURM/cgroup affinity), not every CPU of the node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_labels: str | os.PathLike | None = None,
    devkit_meta: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    shard_bytes: int | str | None = None,
    samples_per_shard: int | None = None,
    workers: int | None = None,
    resize: int | None = None,
    quality: int | None = None,
    validate: str = DEFAULT_VALIDATE,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> DatasetInfo | None:
    """Write the shards and `_info.json` of every split under `src` into `out`; return the metadata
    (None for a dry run). Raises ShardSourceError, with the fix, for unusable input or options."""
    options = shard_options(seed, shard_bytes, samples_per_shard, resize, quality)
    recode = recode_options(resize, quality, validate)
    workers = check_workers(workers)
    src_path, out_path = check_paths(src, out)
    source = scan_source(src_path, _opt_path(val_labels), _opt_path(devkit_meta))
    options["byte_ratio"] = byte_ratio(source, options, recode, out_path)
    plan = make_plan(source, options)
    log_plan(log, source, plan, out_path)
    if dry_run:
        return None
    with exclusive(out_path):
        done = open_output(out_path, plan, source.root, overwrite=overwrite)
        todo = [s for s in plan.shards if s.name not in done]
        if done:
            log(f"resuming: {len(done)} of {len(plan.shards)} shards already written, {len(todo)} to go")
        for record in write_all(todo, source, recode, out_path, workers, progress):
            append_progress(out_path, record)
            done[record["shard"]] = record
        info, skips = finish(out_path, source, plan, done)
    log_summary(log, info, out_path, skips)
    return info


# --- options ---------------------------------------------------------------------------------------------------


def shard_options(seed: int, shard_bytes, samples_per_shard: int | None, resize: int | None,
                  quality: int | None) -> dict:
    """The options that decide which samples go into which shard, and their bytes (the plan's fingerprint)."""
    if shard_bytes is not None and samples_per_shard is not None:
        raise ShardSourceError("give either --shard-bytes or --samples-per-shard, not both")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ShardSourceError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    size = None if samples_per_shard else parse_size(DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes)
    return {"seed": int(seed), "shard_bytes": size, "samples_per_shard": samples_per_shard, "resize": resize,
            "quality": (quality or DEFAULT_QUALITY) if resize else None}


def recode_options(resize: int | None, quality: int | None, validate: str) -> Recode:
    if resize is not None and resize < 1:
        raise ShardSourceError(f"--resize must be a positive size in pixels (the shorter side), got {resize}")
    if quality is not None and resize is None:
        raise ShardSourceError("--quality sets the JPEG quality of resized images; it needs --resize N "
                               "(without --resize the files are stored as they came, never re-encoded)")
    if quality is not None and not 1 <= quality <= 100:
        raise ShardSourceError(f"--quality must be in 1..100 (95 and below recommended), got {quality}")
    if validate not in VALIDATE_MODES:
        raise ShardSourceError(f"--validate must be one of {', '.join(VALIDATE_MODES)}, got {validate!r}")
    return Recode(resize=resize, quality=quality or DEFAULT_QUALITY, validate=validate)


def check_workers(workers: int | None) -> int:
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ShardSourceError(f"--workers must be at least 1, got {workers}")
    return workers


def check_paths(src, out) -> tuple[Path, Path]:
    src_path = Path(src).expanduser().resolve()
    out_path = Path(out).expanduser().resolve()
    for split in SPLITS:
        split_dir = (src_path / split).resolve()  # train/ may be a symlink to another disk
        if out_path == split_dir or split_dir in out_path.parents:
            raise ShardSourceError(f"--out {out_path} is inside the source split {split_dir}; it would be "
                                   f"read as a class folder. Put the shards somewhere else.")
    return src_path, out_path


def _opt_path(path) -> Path | None:
    return None if path is None else Path(path).expanduser()


def byte_ratio(source: Source, options: dict, recode: Recode, out: Path) -> float:
    """Output bytes per source byte. 1 unless resizing into byte-sized shards; then measured on a seeded sample
    of images, or taken from OUT's plan so that a resumed run cuts the same shards."""
    if not options["resize"] or options["samples_per_shard"]:
        return 1.0
    old = read_plan_file(out) or {}
    old_options = dict(old.get("options", {}))
    old_ratio = old_options.pop("byte_ratio", None)
    if old_ratio and old_options == options:
        return old_ratio
    entries = next(iter(source.splits.values())).entries
    picked = random.Random(options["seed"]).sample(entries, min(_RATIO_SAMPLE, len(entries)))
    pairs = [(len(b), e.size) for e in picked if isinstance(b := load_sample(str(source.root / e.rel), recode), bytes)]
    return round(sum(o for o, _ in pairs) / sum(i for _, i in pairs), 4) if pairs else 1.0


# --- writing ---------------------------------------------------------------------------------------------------

_counter = None  # per worker process: the shared count of processed images, for the progress bar


def _init_worker(counter) -> None:
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    # Pool.terminate() stops workers with SIGTERM; the parent's handler (inherited through fork) would turn it
    # into an exception that can leave the task queue's lock held and hang the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _count(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n


def _write_in_worker(task: ShardTask):
    try:
        return write_shard(task, _count)
    except Exception as e:
        raise RuntimeError(f"writing shard {task.name} failed: {type(e).__name__}: {e}") from e


def write_all(todo: list[ShardSpec], source: Source, recode: Recode, out: Path, workers: int,
              progress: bool) -> Iterator[dict]:
    """Write the shards; yield each one's progress record as it finishes (in any order)."""
    tasks = [ShardTask(str(out), s.name, s.fingerprint,
                       tuple((str(source.root / e.rel), e.key, e.label) for e in s.entries), recode) for s in todo]
    total = sum(len(t.samples) for t in tasks)
    if min(workers, len(tasks)) <= 1:
        with _bar(total, progress) as bar:
            for task in tasks:
                yield write_shard(task, bar.update).record()
        return
    # Workers start from a clean interpreter (forkserver), not as forks of this process and its plan: a forked
    # worker's first garbage collection would copy the plan's pages (1.3M entries: ~1 GB a worker at ImageNet size).
    ctx = mp.get_context("forkserver")
    counter = ctx.Value("q", 0)
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool, \
            _bar(total, progress) as bar:
        results = pool.imap_unordered(_write_in_worker, tasks)
        while True:
            try:
                result = results.next(timeout=0.5)
            except mp.TimeoutError:
                bar.update(counter.value - bar.n)
                continue
            except StopIteration:
                break
            bar.update(counter.value - bar.n)
            yield result.record()


def _bar(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="img", desc="make_shards", disable=not enabled, smoothing=0.05, mininterval=1)


def finish(out: Path, source: Source, plan: Plan, done: dict[str, dict]) -> tuple[DatasetInfo, dict[str, list[Skip]]]:
    """Write `_skipped.txt`, then `_info.json` (last, atomically): a directory with `_info.json` is complete."""
    missing = [s.name for s in plan.shards if s.name not in done]
    if missing:
        raise RuntimeError(f"internal error: shards {missing[:3]} were planned but not written; rerun to finish")
    skips = collect_skips(source, plan, done)
    write_skipped(out / SKIPPED_FILE, skips)
    splits = {}
    for split in source.splits:
        names = [s.name for s in plan.split_shards(split)]
        reasons = Counter(s.reason for s in skips[split])
        splits[split] = SplitInfo(split, tuple(names), tuple(done[n]["count"] for n in names),
                                  tuple(sorted(reasons.items())))
    info = DatasetInfo(root=out, label_names=tuple(source.label_names), splits=splits, name=source.root.name)
    write_info(info)
    return info, skips


def collect_skips(source: Source, plan: Plan, done: dict[str, dict]) -> dict[str, list[Skip]]:
    skips = {}
    for split, part in source.splits.items():
        found = [Skip(*s) for shard in plan.split_shards(split) for s in done[shard.name]["skipped"]]
        skips[split] = list(part.skipped) + found
    return skips


def write_skipped(path: Path, skips: dict[str, list[Skip]]) -> None:
    lines = ["# split\treason\tpath\tdetail"]
    lines += [f"{split}\t{s.reason}\t{s.path}\t{s.detail}" for split, items in skips.items() for s in items]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


# --- reporting -------------------------------------------------------------------------------------------------


def log_plan(log, source: Source, plan: Plan, out: Path) -> None:
    names = source.label_names
    log(f"make_shards: {source.root} -> {out}")
    log(f"  {len(names)} classes ({names[0]} .. {names[-1]})")
    for note in source.notes:
        log(f"  {note}")
    for split, part in source.splits.items():
        shards = plan.split_shards(split)
        each = sum(tar_bytes(int(e.size * plan.options["byte_ratio"])) for e in part.entries) / max(1, len(shards))
        log(f"  {split}: {len(part.entries)} images -> {len(shards)} shards (about {human_bytes(each)} each)"
            + (f"; {len(part.skipped)} files left out while listing" if part.skipped else ""))


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def log_summary(log, info: DatasetInfo, out: Path, skips: dict[str, list[Skip]]) -> None:
    for split in info.splits.values():
        log(f"{split.name}: {split.num_samples} samples in {len(split.filenames)} shards, {split.num_skipped} skipped")
    everything = [s for items in skips.values() for s in items]
    if everything:
        reasons = Counter(s.reason for s in everything)
        log(f"skipped {len(everything)} files ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))}); "
            f"full list in {out / SKIPPED_FILE}")
        for s in everything[:_SHOW_SKIPPED]:
            log(f"  {s.reason}: {s.path} ({s.detail})")
    log(f"wrote {', '.join(str(out / f'{split}-*.tar') for split in info.splits)} and {out / INFO_FILE}")


# --- command line ----------------------------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ShardSourceError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipes.shards.make", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", required=True, help="ImageNet-layout folder with train/ and/or val/")
    p.add_argument("--out", required=True, help="directory for the shards and _info.json (created if needed)")
    p.add_argument("--val-labels", help="label file of a flat val/ folder: LOC_val_solution.csv (auto-detected in "
                                        "or next to SRC), '<image> <wnid>' lines, or the devkit's "
                                        "ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--devkit-meta", help="the devkit's data/meta.mat (ILSVRC2012_ID -> wnid), needed with the "
                                         "devkit ground truth; found beside it if there. A text file of wnids in "
                                         "ILSVRC2012_ID order also works")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"shuffle seed (default {DEFAULT_SEED}); part of the plan")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-bytes", type=_size_arg, help="target shard size: 1e9, 1GB, 500MB, 512MiB "
                                                            "(default 1GB)")
    size.add_argument("--samples-per-shard", type=int, help="fixed number of images per shard instead")
    p.add_argument("--workers", type=int, help=f"processes writing shards (default: CPUs available, "
                                               f"{default_workers()} here)")
    p.add_argument("--resize", type=int, metavar="N", help="re-encode as JPEG with the shorter side N (never "
                                                           "upscales; smaller images keep their bytes)")
    p.add_argument("--quality", type=int, help=f"JPEG quality for --resize (default {DEFAULT_QUALITY})")
    p.add_argument("--validate", choices=VALIDATE_MODES, default=DEFAULT_VALIDATE,
                   help="how images are checked: draft = JPEGs decoded at 1/8 scale (fast, still reads every "
                        f"byte), full = full decode (default {DEFAULT_VALIDATE})")
    p.add_argument("--overwrite", action="store_true", help=f"delete shards, {PLAN_FILE} and metadata already "
                                                            f"in OUT and start over")
    p.add_argument("--dry-run", action="store_true", help="list the source and print the plan, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _terminate(signum, frame) -> None:
    # SIGTERM (scancel, timeouts) unwinds like Ctrl-C, so the pool's workers are stopped, not orphaned
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        make_shards(args.src, args.out, val_labels=args.val_labels, devkit_meta=args.devkit_meta, seed=args.seed,
                    shard_bytes=args.shard_bytes, samples_per_shard=args.samples_per_shard, workers=args.workers,
                    resize=args.resize, quality=args.quality, validate=args.validate, overwrite=args.overwrite,
                    dry_run=args.dry_run, progress=not args.no_progress)
    except UserError as e:  # bad input (the source, a label file, an option, the output dir): the message says how
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards: interrupted; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
