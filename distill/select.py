"""D3's class-balanced extra data: score the extra images with a selector, keep the confident ones, balance classes.

The MNv4 recipe (arXiv 2404.10518, §8) takes extra images (JFT there; here any shard set, its labels ignored), scores
each with a selector model (the paper: an EfficientNet-B0; default here: the teacher) on its plain eval view, keeps
the images whose top-class confidence is at least `threshold` (0.3, following Noisy Student), assigns each to its
top class, keeps the `per_class` most confident per class and repeats the images of rarer classes until they have
`per_class` too. A repeated image is a separate member of D3: each copy gets its own augmented views and its own
teacher labels (the view seed includes the member).

The scores are the expensive part and are kept per extra shard (`scores/block-*.npy`), so a killed selection
resumes and shares (ranks, array tasks) score disjoint shards. The selection itself is cheap and deterministic:
whoever has all scores computes it and writes `selection.npz`, `class_counts.json` and `class_counts.png`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipes.image.augment import build_eval_transform
from data_pipes.shards.metadata import DatasetInfo, info_sha256
from data_pipes.stream.loader import init_loader_worker
from data_pipes.stream.members import Members, selection_arrays
from data_pipes.stream.mixture import SourceReader
from distill.identity import json_values, selection_identity
from distill.kdset import RESUME_HINT, KDSetError, read_json, write_atomic, write_json
from distill.sources import SourceConfig
from distill.teacher import SELECTOR, Teacher, autocast_bf16, load_teacher, resolve_device

log = logging.getLogger("distill.select")
SCORE_DTYPE = np.dtype([("cls", "<i4"), ("conf", "<f4")])  # conf -1: the image could not be read
SELECTION = "selection"  # a directory: images.npy, ends.npy, classes.npy
SELECTION_LOCK = "selection.lock"
LEGACY_SELECTION = "selection.npz"  # earlier versions: one entry per member
_LOCK_STALE_SECONDS = 1800
SCORES_IDENTITY = "identity.json"


@dataclass(frozen=True)
class Selection:
    """D3's class-balanced selection, as stored in `<dir>/selection/`: the selected extra images (`images.npy`,
    global indices into the extra split, sorted), where each one's copies end in D3's member sequence (`ends.npy`:
    an image of a rare class is repeated, each copy a member of its own) and each one's class (`classes.npy`).

    At ImageNet size: 20 bytes a selected image, memory-mapped (`Members` opens the maps again in every process
    rather than copying them), whatever per_class makes the member count; nothing is stored per member.
    """

    directory: Path
    counts: dict  # per-class counts before and after, the settings, the best confidence seen
    arrays: tuple[np.ndarray, np.ndarray] | None = None  # (images, ends) of a selection kept in memory (legacy)

    @classmethod
    def load(cls, directory: Path) -> Selection:
        directory = Path(directory)
        if (directory / SELECTION / "ends.npy").is_file():
            return cls(directory / SELECTION, read_json(directory / "class_counts.json"))
        if (directory / LEGACY_SELECTION).is_file():  # made by an earlier version: one entry per member
            with np.load(directory / LEGACY_SELECTION, allow_pickle=False) as z:
                images, repeats = np.unique(z["members"], return_counts=True)
            return cls(directory, read_json(directory / "class_counts.json"), selection_arrays(images, repeats))
        raise KDSetError(f"{directory} has no D3 selection ({SELECTION}/): run `python -m distill.build` with "
                         f"the same overrides to make it")

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / SELECTION / "ends.npy").is_file() or (Path(directory) / LEGACY_SELECTION).is_file()

    def members(self, shards: Sequence[tuple[Path, int]]) -> Members:
        """D3's members over the extra split's shards."""
        if self.arrays is not None:
            return Members(shards, self.arrays)
        return Members(shards, (self.directory / "images.npy", self.directory / "ends.npy"))

    @property
    def classes(self) -> np.ndarray:
        """The class assigned to each selected image."""
        if self.arrays is not None:
            raise KDSetError(f"the D3 selection in {self.directory} predates stored classes")
        return np.load(self.directory / "classes.npy", mmap_mode="r", allow_pickle=False)


def with_selection(source: SourceConfig, selection: Selection) -> SourceConfig:
    """The source restricted to the selected members."""
    return replace(source, selection=selection)


def balance(top: np.ndarray, conf: np.ndarray, num_classes: int, threshold: float,
            per_class: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[int]]]:
    """The selected images (sorted), each one's number of copies and its class, plus the per-class counts:
    `assigned` (top class, any confidence), `passed` (confidence >= threshold), `kept` (the most confident
    `per_class` of those) and `after` (kept, with rare classes repeated up to `per_class`).

    A class with k < per_class kept images repeats them in confidence order, cycling: each image per_class // k
    times, the first per_class % k once more. One sort of the images that passed (by class, confidence, index):
    O(N log N) time and O(N) memory for N extra images, nothing per member."""
    readable = conf >= 0
    passed = readable & (conf >= threshold)
    idx = np.flatnonzero(passed)
    # Most confident first within a class; ties by index, so the selection does not depend on the sort's stability.
    idx = idx[np.lexsort((idx, -conf[idx], top[idx]))]
    cls = top[idx].astype(np.int64)
    rank = np.arange(len(idx)) - np.searchsorted(cls, cls, side="left")
    keep = rank < per_class
    idx, cls, rank = idx[keep], cls[keep], rank[keep]
    kept = np.bincount(cls, minlength=num_classes)
    repeats = per_class // kept[cls] + (rank < per_class % kept[cls])
    order = np.argsort(idx, kind="stable")
    counts = {"assigned": np.bincount(top[readable], minlength=num_classes).tolist(),
              "passed": np.bincount(top[passed], minlength=num_classes).tolist(),
              "kept": kept.tolist(), "after": np.where(kept > 0, per_class, 0).tolist()}
    return idx[order].astype(np.int64), repeats[order].astype(np.int64), cls[order].astype(np.int32), counts


class ScoreRenderer(IterableDataset):
    """Loader workers decode the extra images of whole shards into the selector's eval view, a chunk at a time
    (a worker holds one chunk's bytes, not a shard's)."""

    def __init__(self, members: Members, todo: list[int], size: int, crop_pct: float, interpolation: str,
                 chunk: int) -> None:
        self.members, self.todo, self.chunk = members, todo, chunk
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # Scoring only ranks extra images by the selector's confidence, over many more images than any validation:
        # the DCT-reduced decode (the selection records the selector, threshold and per_class it was made with).
        transform = build_eval_transform(self.size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                                         dct_reduce=True)
        reader = SourceReader(self.members)
        for n, block in enumerate(self.todo):
            if n % workers != worker:
                continue
            first, end = self.members.block_range(block)
            for at in range(first, end, self.chunk):
                raw = reader.read(range(at, min(end, at + self.chunk)))
                images, ok = [], []
                for m in range(at, min(end, at + self.chunk)):
                    try:
                        if isinstance(raw[m], str):
                            raise ValueError(raw[m])
                        images.append(transform(raw[m]["jpg"]))
                        ok.append(True)
                    except Exception as e:  # noqa: BLE001 - an unreadable image is never selected
                        log.warning("kd d3: extra image #%d cannot be read: %s", m, e)
                        images.append(np.zeros((self.size, self.size, 3), np.uint8))
                        ok.append(False)
                yield {"block": block, "offset": at - first, "total": end - first, "ok": ok,
                       "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)}


def score(selector: Teacher, shards: Sequence[tuple[Path, int]], directory: Path, *, share: tuple[int, int],
          batch_size: int, num_workers: int, device: torch.device, autocast: bool) -> None:
    """Score this share's extra shards that have no score file yet (resumable: one file per shard). Scores already in
    `directory` are reused only if the same selector scored the same extra shards (`scores/identity.json`)."""
    claim_scores(directory, score_identity(selector, shards))
    members = Members(shards)
    me, count = share
    todo = [k for k in range(members.num_blocks) if k % count == me and not _score_path(directory, k).is_file()]
    for k in [k for k in todo if members.block_size(k) == 0]:  # an empty shard has nothing to score
        write_atomic(_score_path(directory, k), lambda f: np.save(f, np.zeros(0, SCORE_DTYPE), allow_pickle=False))
        todo.remove(k)
    if not todo:
        return
    log.info("kd d3: scoring %d extra shards with the selector (%s)", len(todo), selector.identity["source"])
    selector.to(device)
    renderer = ScoreRenderer(members, todo, selector.img_size, float(selector.data_config["crop_pct"]),
                             selector.interpolation, batch_size)
    loader = DataLoader(renderer, batch_size=None, num_workers=num_workers, worker_init_fn=init_loader_worker)
    pending: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    start, images = time.time(), 0
    for chunk in loader:
        block = chunk["block"]
        out = pending.setdefault(block, np.zeros(chunk["total"], SCORE_DTYPE))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            probs = selector.probabilities(chunk["images"].to(device))
        conf, top = probs.max(dim=1)
        rows = out[chunk["offset"]:chunk["offset"] + len(chunk["ok"])]
        rows["cls"], rows["conf"] = top.cpu().numpy(), np.where(chunk["ok"], conf.cpu().numpy(), -1.0)
        filled[block] = filled.get(block, 0) + len(chunk["ok"])
        images += len(chunk["ok"])
        if filled[block] == chunk["total"]:
            done = pending.pop(block)
            write_atomic(_score_path(directory, block), lambda f, a=done: np.save(f, a, allow_pickle=False))
    log.info("kd d3: scored %d images in %.1f s (%.1f images/s)", images, time.time() - start,
             images / max(1e-9, time.time() - start))


def score_identity(selector: Teacher, shards: Sequence[tuple[Path, int]]) -> dict[str, Any]:
    """What a score depends on: the selector (its weights and its eval view) and the extra shards (their set's
    `_info.json`). The threshold and per_class do not change a score, only the selection made from the scores."""
    root = Path(shards[0][0]).parent if shards else None
    return json_values({"selector": selector.identity, "extra_root": str(root),
                        "extra_info_sha256": info_sha256(root) if root is not None else None,
                        "view": "eval, DCT-reduced"})


def claim_scores(directory: Path, identity: dict[str, Any]) -> None:
    """Refuse scores made by another selector or of other extra shards; record the identity of new ones."""
    path = Path(directory) / "scores" / SCORES_IDENTITY
    if path.is_file():
        before = read_json(path)
        if before != identity:
            differs = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise KDSetError(f"{directory} holds D3 scores made with another {' and '.join(differs)} "
                             f"(made: {_short(before, differs)}; now: {_short(identity, differs)}): point "
                             f"kd.selection (or kd.sets) at another directory, or delete {path.parent}")
        return
    if any(Path(directory, "scores").glob("block-*.npy")):  # made before scores recorded their selector
        log.warning("kd d3: the scores in %s record no selector (made by an earlier version); they are reused as "
                    "made by %s", path.parent, identity["selector"]["source"])
    write_json(path, identity)


def _short(identity: dict[str, Any], keys: Sequence[str]) -> str:
    text = str({k: identity.get(k) for k in keys})
    return text if len(text) < 300 else text[:300] + "..."


def _score_path(directory: Path, block: int) -> Path:
    return Path(directory) / "scores" / f"block-{block:06d}.npy"


def missing_scores(directory: Path, shards: Sequence) -> list[int]:
    return [k for k in range(len(shards)) if not _score_path(directory, k).is_file()]


def select(directory: Path, shards: Sequence[tuple[Path, int]], *, label_names: Sequence[str], threshold: float,
           per_class: int, identity: dict, deadline: float | None = None) -> Selection:
    """Balance the scored extra images (every score file must exist) and write the selection and its report.

    One process of a launch makes it (whoever takes `selection.lock` first); the others wait for it to appear, until
    `deadline` (a time.time()); a lock left by a killed process is taken over after 30 minutes."""
    directory = Path(directory)
    while not Selection.exists(directory):
        if _take_lock(directory):
            try:
                if not Selection.exists(directory):
                    _make_selection(directory, shards, label_names, threshold, per_class, identity)
            finally:
                (directory / SELECTION_LOCK).unlink(missing_ok=True)
            break
        if deadline is not None and time.time() > deadline:
            raise KDSetError(f"D3's selection in {directory} is being made by another process (it holds "
                             f"{directory / SELECTION_LOCK}) and did not appear in time; {RESUME_HINT}")
        time.sleep(2)
    return Selection.load(directory)


def _take_lock(directory: Path) -> bool:
    lock = directory / SELECTION_LOCK
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime > _LOCK_STALE_SECONDS:
                lock.unlink(missing_ok=True)  # its maker was killed; the next loop takes it
        except FileNotFoundError:
            pass
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _make_selection(directory: Path, shards: Sequence[tuple[Path, int]], label_names: Sequence[str],
                    threshold: float, per_class: int, identity: dict) -> None:
    scores = np.concatenate([np.load(_score_path(directory, k), allow_pickle=False) for k in range(len(shards))])
    readable = scores["conf"] >= 0
    if not readable.any():
        raise KDSetError(f"kd d3: none of the {len(scores)} extra images could be read: check kd.extra_root")
    best = float(scores["conf"][readable].max())
    if best < threshold:
        raise KDSetError(f"kd d3: no extra image reaches kd.sources.d3.threshold={threshold} (the selector's best "
                         f"top-class confidence is {best:.4f} over {int(readable.sum())} images): lower the threshold, "
                         f"use a better selector (kd.sources.d3.selector), or check that the extra data shows the "
                         f"task's classes")
    images, repeats, classes, counts = balance(scores["cls"], scores["conf"], len(label_names), threshold, per_class)
    report = {**identity, "images": len(scores), "readable": int(readable.sum()), "best_confidence": best,
              "classes": list(label_names), **counts,
              "empty_classes": [n for n, k in zip(label_names, counts["kept"]) if k == 0],
              "replicated_classes": sum(1 for k in counts["kept"] if 0 < k < per_class)}
    log.info("%s", table(report))
    if report["empty_classes"]:
        log.warning("kd d3: %d classes have no extra image above the threshold and get none: %s",
                    len(report["empty_classes"]), ", ".join(report["empty_classes"][:20]))
    write_json(directory / "class_counts.json", report)
    plot(report, directory / "class_counts.png")
    # Written into a fresh directory renamed into place: the selection appears whole or not at all.
    tmp = directory / f".{SELECTION}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    images, ends = selection_arrays(images, repeats)
    for name, array in (("images", images), ("classes", classes), ("ends", ends)):
        write_atomic(tmp / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
    os.replace(tmp, directory / SELECTION)


def table(report: dict) -> str:
    """The per-class counts as a text table (the log's copy of class_counts.json)."""
    head = (f"kd d3: class balancing of {report['images']} extra images (threshold {report['threshold']}, "
            f"{report['per_class']} per class)")
    width = max(12, *(len(n) for n in report["classes"]))
    lines = [head, f"  {'class':<{width}} {'top class':>10} {'>= thresh':>10} {'kept':>8} {'after':>8}"]
    for i, name in enumerate(report["classes"]):
        lines.append(f"  {name:<{width}} {report['assigned'][i]:>10} {report['passed'][i]:>10} "
                     f"{report['kept'][i]:>8} {report['after'][i]:>8}")
    lines.append(f"  {'total':<{width}} {sum(report['assigned']):>10} {sum(report['passed']):>10} "
                 f"{sum(report['kept']):>8} {sum(report['after']):>8}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Per-class counts before (passed the threshold) and after balancing, classes sorted by the former."""
    import matplotlib  # optional at import time: only a selection draws (and matplotlib's import costs ~1 s)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional at import time, as above

    before, after = np.asarray(report["passed"]), np.asarray(report["after"])
    order = np.argsort(-before, kind="stable")
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    x = np.arange(len(order))
    ax.bar(x, before[order], width=1.0, color="#9ab", label=f"confidence >= {report['threshold']}")
    ax.step(x, after[order], where="mid", color="#c33", label=f"after balancing ({report['per_class']} per class)")
    ax.set_xlabel("class (sorted by images passing the threshold)")
    ax.set_ylabel("images")
    if before.max() > 20 * max(1, before[before > 0].min() if (before > 0).any() else 1):
        ax.set_yscale("symlog")
    if len(order) <= 30:
        ax.set_xticks(x, [report["classes"][i] for i in order], rotation=60, ha="right", fontsize=7)
    ax.legend()
    ax.set_title("D3: extra images per class")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def build_selector(kd: Mapping[str, Any], info: DatasetInfo, teacher: Teacher) -> Teacher:
    """D3's selector: kd.sources.d3.selector (loaded like a teacher), or the teacher itself."""
    d3 = kd["sources"]["d3"]
    if not d3.get("selector"):
        return teacher
    selector = load_teacher(d3["selector"], settings=SELECTOR, weights=d3.get("selector_weights"),
                            labels=kd["teacher_labels"], num_classes=info.num_classes)
    selector.check_classes(tuple(info.label_names), f"the data at {info.root} (as kd.sources.d3.selector)")
    return selector


def score_args(kd: Mapping[str, Any]) -> dict[str, Any]:
    """`score`'s batch, workers, device and autocast from the build settings (kd.build)."""
    b = kd["build"]
    device = resolve_device(b["device"])
    return {"batch_size": int(b["batch_size"]), "num_workers": int(b["num_workers"]), "device": device,
            "autocast": autocast_bf16(device, b["precision"])}


def wait_for_selection(d3: SourceConfig, directory: Path, kd: Mapping[str, Any], label_names: Sequence[str],
                       share: tuple[int, int]) -> Selection:
    """D3's selection, once every share has scored its extra shards (waiting up to kd.build.wait_minutes)."""
    me, count = share
    deadline = time.time() + 60 * float(kd["build"]["wait_minutes"])
    while missing := missing_scores(directory, d3.shards):
        if time.time() > deadline:
            raise KDSetError(f"share {me} of {count}: D3's selection needs the scores of {len(missing)} extra shards "
                             f"that other shares have not finished (first: {missing[:5]}); {RESUME_HINT} once they "
                             f"have (this share's finished blocks are kept)")
        log.info("distill.build: waiting for other shares to score %d extra shards", len(missing))
        time.sleep(10)
    settings = selection_identity(kd)
    return select(directory, d3.shards, label_names=label_names, threshold=settings["threshold"],
                  per_class=settings["per_class"], identity=settings | {"extra_root": str(d3.root)},
                  deadline=deadline)
