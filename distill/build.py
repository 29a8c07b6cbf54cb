"""`python -m distill.build [train overrides]`: label the distillation sets once (the MNv4 recipe's offline views).

    python -m distill.build data.root=/data/imagenet-wds kd.teacher=runs/teacher/export kd.sets=/data/kd-sets
    torchrun --nproc-per-node 8 -m distill.build ...     # or a SLURM array: each task builds a disjoint share

It composes the same config as `python -m train` (same conf/, same overrides), so one config describes the views
that are built and the run that trains on them. For every source (kd.sources), every member and every replica it
draws the view's parameters (`distill.views.draw_view`), renders the view (crop, flip, RandAugment or mixup, JPEG
round-trip), runs the teacher on it in batches on the accelerator, and keeps the top-k probabilities; `params`
storage keeps the parameters (replayed at training time), `pixels` the view's JPEG bytes as well (see
`distill.kdset` for the layout). A block (one source shard) is the unit of work: a killed build resumes without
redoing finished blocks, and shares (ranks or array tasks) take disjoint blocks. The share that finishes the last
block writes manifest.json.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_pipes.image.decode import resize
from data_pipes.image.views import checksum
from data_pipes.shards.metadata import info_sha256, read_info
from data_pipes.stream.loader import init_loader_worker
from data_pipes.stream.mixture import SourceReader
from distill.kdset import (
    BUILD_FILE,
    MANIFEST,
    KDSetError,
    block_path,
    quantize,
    read_json,
    record_dtype,
    write_atomic,
    write_json,
)
from distill.recipe import SourceConfig, build_teacher, plain, source_configs, view_size
from distill.select import SELECTION, Selection, missing_scores, score, select, with_selection
from distill.teacher import Teacher, load_teacher
from distill.views import draw_view, peek_partner, view_rng

log = logging.getLogger("distill.build")
RESUME_HINT = "run the same `python -m distill.build ...` command again: it resumes where it stopped"


# ------------------------------------------------------------------------------------------------ identity


def versions() -> dict[str, str]:
    """Libraries whose output a replayed view depends on (decoder, resize and augmentation kernels)."""
    import albumentations
    import cv2
    import PIL
    import simplejpeg

    return {"simplejpeg": simplejpeg.__version__, "opencv": cv2.__version__,
            "albumentations": albumentations.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__}


def build_identity(kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher, size: int,
                   label_names) -> dict[str, Any]:
    """What must be equal for two builds (or a build and a training run) to mean the same views (as JSON values,
    so that it compares equal to what a manifest read back holds)."""
    return _as_json({
        "teacher": teacher.identity,
        "label_names": list(label_names),
        "storage": kd["storage"], "top_k": int(kd["top_k"]), "seed": int(kd["seed"]), "view_size": size,
        "sources": {s.name: {"index": s.index, "root": str(s.root), "info_sha256": info_sha256(s.root),
                             "replicas": s.replicas, "labelled": s.labelled, "recipe": _recipe_dict(s)}
                    | ({"selection": selection_identity(kd)} if s.selected else {})
                    for s in sources},
    })


def _as_json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True))


def _recipe_dict(s: SourceConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s.recipe).items()}


# ------------------------------------------------------------------------------------------------ the work


@dataclass(frozen=True)
class Task:
    source: int  # index into the build's sources
    block: int


class ViewRenderer(IterableDataset):
    """Loader workers render the views of whole blocks, in chunks of `chunk` views (replica-major)."""

    def __init__(self, sources: list[SourceConfig], tasks: list[Task], seed: int, teacher_size: int,
                 teacher_interpolation: str, chunk: int, checks: int, storage: str) -> None:
        self.sources, self.tasks, self.seed, self.chunk, self.checks = sources, tasks, seed, chunk, checks
        self.teacher_size, self.teacher_interpolation, self.storage = teacher_size, teacher_interpolation, storage

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for n, task in enumerate(self.tasks):
            if n % workers == worker:
                yield from self._task(n, task)

    def _task(self, n: int, task: Task) -> Iterator[dict]:
        s = self.sources[task.source]
        reader = SourceReader(s.blocks)
        first, end = int(reader.starts[task.block]), int(reader.starts[task.block + 1])
        raw = reader.read(range(first, end))
        checked = check_positions(end - first, s.replicas, self.checks)
        views = [(r, m) for r in range(s.replicas) for m in range(first, end)]
        for at in range(0, len(views), self.chunk):
            yield self._chunk(n, s, reader, raw, first, views[at:at + self.chunk], checked)

    def _chunk(self, n, s: SourceConfig, reader: SourceReader, raw: dict, first: int, views: list, checked) -> dict:
        records = np.zeros(len(views), dtype=s.recipe.dtype)
        images, ok, encoded, sums = [], [], [], {}
        for i, (replica, member) in enumerate(views):
            sample = raw[member]
            try:
                if isinstance(sample, str):
                    raise ValueError(sample)
                partner = peek_partner(reader, self.seed, s.index, replica, member) if s.recipe.mixes else None
                extra = {} if partner is None else {partner: raw[partner]["jpg"]}
                record = draw_view(s.recipe, reader, view_rng(self.seed, s.index, replica, member), member,
                                   sample["jpg"], extra)
                view, data = s.recipe.render_encoded(record, sample["jpg"], extra.get(partner))
                records[i] = record
                ok.append(True)
            except Exception as e:  # noqa: BLE001 - a view that cannot be made is stored empty and skipped later
                log.warning("kd source %s member %d replica %d: %s: %s", s.name, member, replica, type(e).__name__, e)
                view, data = np.zeros((s.recipe.size, s.recipe.size, 3), np.uint8), None
                ok.append(False)
            if (replica, member - first) in checked and ok[-1]:
                sums[f"{replica},{member - first}"] = checksum(view)
            images.append(resize(view, self.teacher_size, self.teacher_size, self.teacher_interpolation))
            if self.storage == "pixels":
                encoded.append((data if data is not None else _png(view),
                                int(sample["cls"]) if not isinstance(sample, str) and "cls" in sample else -1))
        # Structured arrays cross the worker boundary as bytes (the loader's collation would try to make tensors).
        return {"task": n, "views": [(r, m - first) for r, m in views], "records": records.tobytes(), "ok": ok,
                "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), "encoded": encoded,
                "checksums": sums}


def check_positions(members: int, replicas: int, count: int) -> set[tuple[int, int]]:
    """The (replica, offset) of the views of a block whose checksums are stored: spread over both axes."""
    return {(j % replicas, (j * 7919) % members) for j in range(min(count, members * replicas))}


def _png(view: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", np.ascontiguousarray(view[:, :, ::-1]))[1].tobytes()


class BlockWriter:
    """Collects one block's labelled views and writes its files (tar, checksums, then the records last)."""

    def __init__(self, directory: Path, s: SourceConfig, members: int, dtype: np.dtype) -> None:
        self.directory, self.source, self.members = directory, s, members
        self.records = np.zeros((s.replicas, members), dtype=dtype)
        self.pixels: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.checksums: dict[str, str] = {}
        self.remaining = s.replicas * members

    def add(self, chunk: dict, ids: np.ndarray, probs: np.ndarray) -> None:
        views = np.frombuffer(chunk["records"], dtype=self.source.recipe.dtype)
        for i, (replica, offset) in enumerate(chunk["views"]):
            row = self.records[replica, offset]
            row["view"] = views[i]
            if chunk["ok"][i]:
                row["ids"], row["probs"] = ids[i], quantize(probs[i])
            if chunk["encoded"]:
                self.pixels[(replica, offset)] = chunk["encoded"][i]
        self.checksums.update(chunk["checksums"])
        self.remaining -= len(chunk["views"])

    def write(self, block: int) -> None:
        if self.pixels:
            write_atomic(block_path(self.directory, block, ".tar"), self._write_tar)
        write_json(block_path(self.directory, block, ".check.json"), self.checksums)
        write_atomic(block_path(self.directory, block), lambda f: np.save(f, self.records, allow_pickle=False))

    def _write_tar(self, f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for replica in range(self.source.replicas):
                for offset in range(self.members):
                    data, target = self.pixels[(replica, offset)]
                    key = f"v{replica:05d}_{offset:07d}"
                    ext = "jpg"
                    for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(target).encode())):
                        member = tarfile.TarInfo(name)
                        member.size, member.mtime = len(payload), 0
                        tar.addfile(member, io.BytesIO(payload))


def shares() -> tuple[int, int]:
    """(this share, number of shares): torchrun's RANK/WORLD_SIZE, or a SLURM array's task id/count."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg, *, share: tuple[int, int] | None = None, stop_after: int | None = None) -> Path:
    """Build (or resume) the kd sets of `cfg`; returns their directory. `stop_after` blocks: for tests of resume."""
    kd = plain(cfg.kd)
    if not kd["sets"]:
        raise KDSetError("set kd.sets=DIR: where the labelled views are written")
    if kd["storage"] not in ("params", "pixels"):
        raise KDSetError(f"kd.storage must be params or pixels, got {kd['storage']!r}")
    info = read_info(cfg.data.root)
    teacher = build_teacher(kd, info)
    student_size = int(cfg.data.img_size or cfg.model.resolution)
    size = view_size(kd, student_size, teacher)
    sources = source_configs(kd, size)
    out = Path(str(kd["sets"])).expanduser()
    identity = build_identity(kd, sources, teacher, size, info.label_names)
    _claim(out, identity)
    me, count = share or shares()
    budget = [stop_after]
    # D3's scores first (other shares may wait for them), then D1/D2, then D3 once every share's scores exist.
    d3 = next((s for s in sources if s.selected), None)
    if d3 is not None:
        selector = build_selector(kd, info, teacher)
        score(selector, d3.shards, out / d3.name, share=(me, count), **score_args(kd))
    plain_sources = [s for s in sources if not s.selected]
    _build_blocks(plain_sources, me, count, teacher, kd, out, budget)
    if d3 is not None and budget[0] != 0:
        resolved = with_selection(d3, _wait_for_selection(d3, out, kd, info.label_names, me, count))
        sources = [resolved if s.selected else s for s in sources]
        _build_blocks([resolved], me, count, teacher, kd, out, budget)
    resolved = all(s.members is not None for s in sources if s.selected)
    complete = resolved and all(_done(out, s, k) for s in sources for k in range(len(s.blocks)))
    if complete and not (out / MANIFEST).is_file():
        write_json(out / MANIFEST, _manifest(identity, sources, out, kd))
        log.info("distill.build: all blocks built; wrote %s", out / MANIFEST)
    return out


def _build_blocks(sources: list[SourceConfig], me: int, count: int, teacher: Teacher, kd: dict, out: Path,
                  budget: list) -> None:
    """Label this share's unfinished blocks of `sources` (block n of the list goes to share n mod count)."""
    tasks = [Task(i, k) for i, s in enumerate(sources) for k in range(len(s.blocks))]
    todo = [t for n, t in enumerate(tasks) if n % count == me and not _done(out, sources[t.source], t.block)]
    if budget[0] is not None:
        todo, budget[0] = todo[:budget[0]], max(0, budget[0] - len(todo))
    log.info("distill.build %s: %d blocks, %d for share %d of %d still to build -> %s",
             "+".join(s.name for s in sources), len(tasks), len(todo), me, count, out)
    if todo:
        _label(todo, sources, teacher, kd, out)


def build_selector(kd: Mapping[str, Any], info, teacher: Teacher) -> Teacher:
    """D3's selector: kd.sources.d3.selector (loaded like a teacher), or the teacher itself."""
    d3 = kd["sources"]["d3"]
    if not d3.get("selector"):
        return teacher
    selector = load_teacher(d3["selector"], weights=d3.get("selector_weights"), labels=kd["teacher_labels"],
                            num_classes=info.num_classes)
    selector.check_classes(tuple(info.label_names), f"the data at {info.root} (as kd.sources.d3.selector)")
    return selector


def score_args(kd: Mapping[str, Any]) -> dict[str, Any]:
    b = kd["build"]
    device = _device(b["device"])
    autocast = device.type == "cuda" and b["precision"] in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return {"batch_size": int(b["batch_size"]), "num_workers": int(b["num_workers"]), "device": device,
            "autocast": autocast}


def selection_identity(kd: Mapping[str, Any]) -> dict[str, Any]:
    d3 = kd["sources"]["d3"]
    return {"selector": d3.get("selector") or "teacher", "threshold": float(d3["threshold"]),
            "per_class": int(d3["per_class"])}


def _wait_for_selection(d3: SourceConfig, out: Path, kd: Mapping[str, Any], label_names, me: int,
                        count: int) -> Selection:
    """The D3 selection, once every share has scored its extra shards (waiting up to kd.build.wait_minutes)."""
    directory = out / d3.name
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
                  per_class=settings["per_class"], identity=settings | {"extra_root": str(d3.root)})


def _claim(out: Path, identity: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = out / BUILD_FILE
    if existing.is_file():
        before = read_json(existing)
        if before != identity:
            diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise KDSetError(f"{out} holds kd sets built with another configuration (differs in {', '.join(diff)}): "
                             f"build into a new kd.sets directory, or delete this one")
    else:
        write_json(existing, identity)


def _done(out: Path, s: SourceConfig, block: int) -> bool:
    return block_path(out / s.name, block).is_file()


def _label(todo: list[Task], sources: list[SourceConfig], teacher: Teacher, kd: dict, out: Path) -> None:
    b = kd["build"]
    device = _device(b["device"])
    teacher.to(device)
    autocast = device.type == "cuda" and b["precision"] in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    top_k = int(kd["top_k"])
    renderer = ViewRenderer(sources, todo, int(kd["seed"]), teacher.img_size, teacher.interpolation,
                            int(b["batch_size"]), int(b["checks_per_block"]), kd["storage"])
    loader = DataLoader(renderer, batch_size=None, num_workers=int(b["num_workers"]),
                        worker_init_fn=init_loader_worker, pin_memory=device.type == "cuda")
    writers: dict[int, BlockWriter] = {}
    total = sum(sources[t.source].replicas * _block_members(sources[t.source], t.block) for t in todo)
    bar = tqdm(total=total, unit="view", desc="distill.build", smoothing=0.05, mininterval=2,
               disable=not sys.stderr.isatty() and not os.environ.get("KD_PROGRESS"))
    start = time.time()
    for chunk in loader:
        task = todo[chunk["task"]]
        s = sources[task.source]
        if chunk["task"] not in writers:
            writers[chunk["task"]] = BlockWriter(out / s.name, s, _block_members(s, task.block),
                                                 record_dtype(s.recipe.dtype, len(teacher.label_names), top_k))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            probs = torch.softmax(teacher.logits(chunk["images"].to(device, non_blocking=True)), dim=1)
        top = probs.topk(min(top_k, probs.size(1)), dim=1)
        writer = writers[chunk["task"]]
        writer.add(chunk, top.indices.cpu().numpy(), top.values.float().cpu().numpy())
        bar.update(len(chunk["views"]))
        if writer.remaining == 0:
            writer.write(task.block)
            del writers[chunk["task"]]
    bar.close()
    log.info("distill.build: %d views in %.1f s (%.1f views/s)", total, time.time() - start,
             total / max(1e-9, time.time() - start))


def _block_members(s: SourceConfig, block: int) -> int:
    return len(s.blocks[block][1])


def _manifest(identity: dict, sources: list[SourceConfig], out: Path, kd: dict) -> dict:
    per_source = {}
    for s in sources:
        members = sum(len(m) for _, m in s.blocks)
        views = members * s.replicas
        files = list((out / s.name).glob("block-*.npy")) + list((out / s.name).glob("block-*.tar"))
        per_source[s.name] = {"members": members, "views": views, "blocks": len(s.blocks),
                              "bytes": sum(f.stat().st_size for f in files),
                              "bytes_per_view": sum(f.stat().st_size for f in files) / max(1, views)}
    manifest = {**identity, "counts": per_source, "versions": versions(), "format": 1}
    if any(s.selected for s in sources):
        manifest["d3_classes"] = read_json(out / "d3" / "class_counts.json")
    return manifest


@dataclass(frozen=True)
class KDSets:
    """Built kd sets, checked against the run that trains on them (`KDSets.open`)."""

    root: Path
    manifest: dict

    @property
    def storage(self) -> str:
        return self.manifest["storage"]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def identity(self) -> dict[str, Any]:
        import hashlib

        manifest = hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()[:16]
        return {"root": str(self.root), "storage": self.storage, "top_k": self.top_k, "manifest_sha256": manifest,
                "teacher": self.manifest["teacher"]["source"],
                "teacher_sha256": self.manifest["teacher"]["weights_sha256"],
                "sources": {k: v["replicas"] for k, v in self.manifest["sources"].items()}}

    def resolve(self, sources: list[SourceConfig]) -> list[SourceConfig]:
        """The sources with D3's members as the build selected them."""
        return [with_selection(s, Selection.load(self.root / s.name)) if s.selected else s for s in sources]

    @classmethod
    def open(cls, root: Path, *, kd: Mapping[str, Any], sources: list[SourceConfig], teacher: Teacher,
             label_names, check: bool = True) -> KDSets:
        root = Path(root).expanduser()
        if not (root / MANIFEST).is_file():
            raise KDSetError(_incomplete(root, sources))
        manifest = read_json(root / MANIFEST)
        size = sources[0].recipe.size
        now = build_identity(kd, sources, teacher, size, label_names)
        _compare(root, manifest, now)
        sets = cls(root, manifest)
        if check:
            sets.check_pixels(sets.resolve(sources))
        return sets

    def check_pixels(self, sources: list[SourceConfig]) -> None:
        """Re-render the views whose checksums the build stored; stop with the likely cause when any differs."""
        from distill.views import StoredViews

        for s in sources:
            reader = SourceReader(s.blocks)
            views = StoredViews(s.recipe, reader, directory=self.root / s.name, replicas=s.replicas,
                                storage=self.storage, labelled=s.labelled)
            sums = read_json(block_path(self.root / s.name, 0, ".check.json"))
            from data_pipes.stream.mixture import Item

            for key, expected in sums.items():
                replica, offset = (int(v) for v in key.split(","))
                rendered = views.render([Item(s.index, offset, replica)])[0]
                if rendered.view is None or checksum(rendered.view) != expected:
                    raise KDSetError(self._mismatch(s, replica, offset, rendered.error))

    def _mismatch(self, s: SourceConfig, replica: int, offset: int, error: str | None) -> str:
        built, now = self.manifest.get("versions", {}), versions()
        changed = [f"{k} {built.get(k)} (build) vs {v} (now)" for k, v in now.items() if built.get(k) != v]
        if changed:
            cause = "the libraries that decode and augment differ: " + "; ".join(changed)
        else:
            cause = "the view code or the source images changed since the build"
        what = f"cannot be rendered ({error})" if error else "renders other pixels than the build's"
        return (f"kd set {self.root}: view (replica {replica}, member {offset}) of source {s.name} {what}; "
                f"{cause}. Train in the environment that built the sets, or rebuild them here (python -m "
                f"distill.build)")


def _incomplete(root: Path, sources: list[SourceConfig]) -> str:
    if not (root / BUILD_FILE).is_file():
        return (f"kd.sets={root} holds no built kd sets: build them with `python -m distill.build <same overrides> "
                f"kd.sets={root}`, or train online with kd.sets=null")
    missing, parts = {}, []
    for s in sources:
        if s.selected and not (root / s.name / SELECTION).is_file():
            scores = missing_scores(root / s.name, s.shards)
            parts.append(f"{s.name}: its class-balanced selection"
                         + (f" ({len(scores)} of {len(s.shards)} extra shards not scored yet)" if scores else ""))
            continue
        source = with_selection(s, Selection.load(root / s.name)) if s.selected else s
        missing[s.name] = [k for k in range(len(source.blocks)) if not block_path(root / s.name, k).is_file()]
    parts += [f"{name}: {len(blocks)} of the blocks (first: {blocks[:5]})" for name, blocks in missing.items()
              if blocks]
    return (f"kd.sets={root} is only partly built (missing {'; '.join(parts) or 'the manifest'}): {RESUME_HINT} "
            f"(every share, if it was split)")


def _compare(root: Path, built: dict, now: dict) -> None:
    checks = [
        ("teacher weights", built["teacher"]["weights_sha256"], now["teacher"]["weights_sha256"],
         "it was built by another teacher: pass the kd.teacher it was built with, or rebuild"),
        ("class names", built["label_names"], now["label_names"], "it was built for another class list"),
    ]
    for name, src in now["sources"].items():
        was = built["sources"].get(name)
        if was is None:
            raise KDSetError(f"kd set {root} has no source {name}: rebuild with it, or set kd.sources.{name}.weight=0")
        checks += [
            (f"{name} source shards", was["info_sha256"], src["info_sha256"],
             f"it was built from other source shards ({was['root']})"),
            (f"{name} recipe", was["recipe"], src["recipe"], "its augmentation recipe differs from the configured one"),
            (f"{name} replicas", was["replicas"], src["replicas"], "kd.sources replicas differ"),
            (f"{name} selection", was.get("selection"), src.get("selection"),
             "D3's selector, threshold or per_class differ from the configured ones"),
        ]
    checks += [(k, built[k], now[k], f"kd.{k} differs") for k in ("storage", "top_k", "seed", "view_size")]
    for name, was, is_, why in checks:
        if was != is_:
            raise KDSetError(f"kd set {root} does not fit this run ({name}): {why}; built {_short(was)}, "
                             f"configured {_short(is_)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="train")
    def _run(cfg) -> None:
        from data_pipes.shards.metadata import DatasetError
        from distill.teacher import TeacherError

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            build(cfg)
        except (DatasetError, TeacherError, KDSetError) as e:
            log.error("%s", e)
            sys.exit(2)

    _run()


if __name__ == "__main__":
    main()
