"""Does distillation beat labels alone on real photos? The MNv4 recipe against a labels-only run, on Imagenette.

    python -m bench.distill_evidence                 # everything below, on the CPU (about an hour on 2 cores)
    python -m bench.distill_evidence --stage teacher # just the splits and the teacher (the slow part)

Data (`../shared/data/imagenette2-224`, 10 ImageNet classes; made once under --cache-dir as symlinks + shards):
  all       every train photo (9,469): the teacher's training set
  labelled  --labelled (default 20 %) of each class's train photos, drawn with --seed: the student's labelled data
  extra     the other train photos, their labels ignored: D3's extra images, class-balanced by the teacher
  val       the whole val split (3,925 photos) in every set: every top-1 below is against its true labels

Runs, all with our pipeline (`train.run.train`, the config `python -m train` composes) and one student, seed and
number of images seen (--epochs x the labelled split's size):
  teacher          --teacher trained on `all` for --teacher-epochs (labels, the default recipe)
  labels only      the student on `labelled`, the default recipe (Inception crop, label smoothing)
  online KD        kd=logit: label loss + KL(T=4) against the teacher on the same augmented batch (timm's semantics)
  offline D1       distill=true, built D1 only (RandAugment l2m9 views, teacher top-10 labels)
  offline D1+D2+D3 distill=true at 1:1:2: D1, D2 (extreme mixup) and the class-balanced extra photos (D3)
Every stage is cached (a finished run's export is reused), so a killed run resumes at the stage it was in. The
table goes to stdout and to <cache-dir>/evidence.md; val top-1 is the exported student's, measured by the export
on the whole val split.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from bench.common import DEFAULT_SRC, IMAGE_SUFFIXES, REPO, machine_summary
from train.nets.configs import compose_config

DEFAULT_CACHE = REPO / ".cache" / "evidence"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_splits(src: Path, cache: Path, labelled: float, seed: int) -> dict[str, Path]:
    """The three image folders (symlinks to the photos) and their shards; made once."""
    roots = {name: cache / f"{name}-shards" for name in ("all", "labelled", "extra")}
    if all((r / "_info.json").is_file() for r in roots.values()):
        return roots
    from data_pipes.shards.make import make_shards

    rng = random.Random(seed)
    folders = {name: cache / f"{name}-images" for name in roots}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    for name in classes:
        photos = _images(src / "train" / name)
        chosen = set(rng.sample(range(len(photos)), round(labelled * len(photos))))
        for i, photo in enumerate(photos):
            for split in ("all", "labelled" if i in chosen else "extra"):
                target = folders[split] / "train" / name / photo.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(photo.resolve())
        for split in ("all", "labelled", "extra"):
            for photo in _images(src / "val" / name):
                target = folders[split] / "val" / name / photo.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(photo.resolve())
    for name, folder in folders.items():
        if not (roots[name] / "_info.json").is_file():
            shutil.rmtree(roots[name], ignore_errors=True)
            make_shards(folder, roots[name], samples_per_shard=256, workers=2, progress=False, log=lambda *_: None)
    return roots


def compose(overrides: list[str]):
    return compose_config(overrides)


def common(args, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.progress_bar=false",
            "logger.wandb.enabled=false", f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", "data.shuffle_window=1024", f"seed={args.seed}",
            "sched.warmup_epochs=2", f"optim.lr={args.lr}", "export=true"]


def run(name: str, overrides: list[str], run_dir: Path, log: list[str]) -> dict:
    """Train one run unless its export exists; returns its export metrics and the time it took."""
    metrics_file = run_dir / "export" / "metrics.json"
    timing = run_dir / "evidence_time.json"
    if not metrics_file.is_file():
        from train.run import train

        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== {name}: python -m train {' '.join(overrides)}", flush=True)
        start = time.time()
        train(compose(overrides))
        timing.write_text(json.dumps({"seconds": time.time() - start}))
    log.append(f"{name}: python -m train {' '.join(overrides)}")
    out = json.loads(metrics_file.read_text())
    out["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
    return out


def build_sets(overrides: list[str], log: list[str]) -> None:
    from distill.build import build

    log.append(f"build: python -m distill.build {' '.join(overrides)}")
    start = time.time()
    build(compose(overrides))
    print(f"== built kd sets in {time.time() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--teacher", default="mnv3_l_100")
    p.add_argument("--teacher-epochs", type=int, default=16)
    p.add_argument("--student", default="mnv3_s_075")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--labelled", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=40, help="student epochs over the labelled split's size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=0, help="D3 images per class; 0: the extra split's mean")
    p.add_argument("--max-replicas", type=int, default=0,
                   help="cap each source's built replicas (0: one per pass, nothing shown twice); a cap below the "
                        "passes shows each built view more than once, for a cheaper build")
    p.add_argument("--stage", choices=("teacher", "all"), default="all")
    args = p.parse_args(argv)
    if not (args.src / "train").is_dir():
        raise SystemExit(f"no photos at {args.src} (need train/<class>/<image> and val/): pass --src DIR")
    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    roots = make_splits(args.src, cache, args.labelled, args.seed)
    log: list[str] = []
    rows = []
    teacher_dir = cache / "runs" / "teacher"
    teacher = run("teacher", [f"model={args.teacher}", f"data.root={roots['all']}",
                              f"trainer.max_epochs={args.teacher_epochs}", *common(args, teacher_dir)],
                  teacher_dir, log)
    rows.append(("teacher", args.teacher, "all train (labels)", teacher))
    if args.stage == "teacher":
        return _report(args, cache, rows, log)

    from data_pipes.shards.metadata import read_info

    labelled_n = read_info(roots["labelled"]).split("train").num_samples
    extra_n = read_info(roots["extra"]).split("train").num_samples
    seen = args.epochs * labelled_n
    # Validation every 10 epochs only (the table's number is the export's, on the whole val split, at the end).
    student = [f"model={args.student}", f"data.root={roots['labelled']}", f"trainer.max_epochs={args.epochs}",
               f"trainer.check_val_every_n_epoch={min(10, args.epochs)}"]
    kd_common = ["distill=true", f"kd.teacher={teacher_dir / 'export'}", f"kd.epoch_samples={labelled_n}",
                 "kd.build.num_workers=2", "kd.build.batch_size=128", f"kd.seed={args.seed}"]

    d = cache / "runs" / "labels_only"
    rows.append(("labels only", args.student, f"labelled {labelled_n}", run("labels only", [*student, *common(args, d)],
                                                                            d, log)))
    d = cache / "runs" / "online_kd"
    rows.append(("online KD (kd=logit, T=4)", args.student, f"labelled {labelled_n}",
                 run("online KD", [*student, *kd_common, "kd=logit", *common(args, d)], d, log)))

    # Offline D1 only: each pass over the labelled images shows another built replica.
    cap = (lambda n: min(n, args.max_replicas)) if args.max_replicas else (lambda n: n)
    sets_d1 = cache / "sets" / f"d1-r{cap(args.epochs)}"
    d1 = [*kd_common, f"kd.sets={sets_d1}", "kd.sources.d2.weight=0", f"kd.sources.d1.replicas={cap(args.epochs)}"]
    build_sets([*student, *d1, *common(args, cache / "runs" / "build")], log)
    d = cache / "runs" / f"offline_d1-r{cap(args.epochs)}"
    rows.append(("offline D1", args.student, f"labelled {labelled_n}", run("offline D1", [*student, *d1,
                                                                                          *common(args, d)], d, log)))

    # D1 + D2 + D3 at 1:1:2: a quarter of the samples from each labelled source, half from the extra photos.
    per_class = args.per_class or max(1, extra_n // read_info(roots["extra"]).num_classes)
    passes_labelled = -(-seen // 4 // labelled_n)
    passes_extra = -(-seen // 2 // (per_class * read_info(roots["extra"]).num_classes))
    sets_all = cache / "sets" / f"d123-r{cap(passes_labelled)}-{cap(passes_extra)}-pc{per_class}"
    d123 = [*kd_common, f"kd.sets={sets_all}", f"kd.extra_root={roots['extra']}",
            f"kd.sources.d1.replicas={cap(passes_labelled)}", f"kd.sources.d2.replicas={cap(passes_labelled)}",
            f"kd.sources.d3.replicas={cap(passes_extra)}", f"kd.sources.d3.per_class={per_class}"]
    build_sets([*student, *d123, *common(args, cache / "runs" / "build")], log)
    d = cache / "runs" / f"offline_d123-r{cap(passes_labelled)}-{cap(passes_extra)}"
    rows.append(("offline D1+D2+D3 (1:1:2)", args.student, f"labelled {labelled_n} + extra {extra_n}",
                 run("offline D1+D2+D3", [*student, *d123, *common(args, d)], d, log)))
    _report(args, cache, rows, log, seen=seen)


def _report(args, cache: Path, rows: list, log: list[str], seen: int | None = None) -> None:
    lines = [f"machine: {machine_summary(__import__('torch').device('cpu'))}",
             f"images seen per student run: {seen}" if seen else "", "",
             "| run | model | train data | val top-1 | val top-5 | minutes |", "|---|---|---|---|---|---|"]
    for name, model, data, m in rows:
        lines.append(f"| {name} | {model} | {data} | {m['top1']:.2f} | {m['top5']:.2f} | {m['seconds'] / 60:.1f} |")
    labels = next((m for name, _, _, m in rows if name == "labels only"), None)
    if labels is not None:
        lines.append("")
        for name, _, _, m in rows[2:]:
            lines.append(f"{name}: {m['top1'] - labels['top1']:+.2f} top-1 points over labels only")
    text = "\n".join([*lines, "", "commands:", *log])
    (cache / "evidence.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
