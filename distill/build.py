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

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_pipes.errors import Problems, UserError
from data_pipes.launch import work_share
from data_pipes.shards.metadata import DatasetInfo
from data_pipes.shards.prepare import prepare_dataset
from data_pipes.stream.loader import init_loader_worker
from distill.identity import build_identity, versions
from distill.kdset import BUILD_FILE, MANIFEST, KDSetError, block_path, read_json, record_dtype, write_json
from distill.recipe import check_inputs
from distill.render import BlockWriter, Task, ViewRenderer, views_done
from distill.select import build_selector, score, score_args, wait_for_selection, with_selection
from distill.sources import SourceConfig, source_configs, view_size
from distill.teacher import Teacher, autocast_bf16, release, resolve_device
from train.nets.configs import CONF_DIR, TRAIN_CONFIG, plain, remove_if_empty

log = logging.getLogger("distill.build")


def build(cfg, *, share: tuple[int, int] | None = None, stop_after: int | None = None) -> Path:
    """Build (or resume) the kd sets of `cfg`; returns their directory. `stop_after` blocks: for tests of resume."""
    kd = plain(cfg.kd)
    info, teacher = preflight(cfg, kd)
    if int(kd["top_k"]) > info.num_classes:  # the identity records the same min (distill.identity)
        log.info("kd.top_k=%s is more than the data's %d classes: every class's probability is stored",
                 kd["top_k"], info.num_classes)
    student_size = int(cfg.data.img_size or cfg.model.resolution)
    size = view_size(kd, student_size, teacher)
    sources = source_configs(kd, size)
    out = Path(str(kd["sets"])).expanduser()
    identity = build_identity(kd, sources, teacher, size, info.label_names)
    _claim(out, identity)
    me, count = share or work_share()  # torchrun workers, srun tasks, array tasks: each its own share and device
    budget = [stop_after]
    # D3's scores first (other shares may wait for them), then D1/D2, then D3 once every share's scores exist.
    d3 = next((s for s in sources if s.selected), None)
    if d3 is not None:
        selector = build_selector(kd, info, teacher)
        score(selector, d3.shards, out / d3.name, share=(me, count), **score_args(kd))
        if selector is not teacher:
            release(selector)
    plain_sources = [s for s in sources if not s.selected]
    _build_blocks(plain_sources, me, count, teacher, kd, out, budget)
    if d3 is not None and budget[0] != 0:
        resolved = with_selection(d3, wait_for_selection(d3, out / d3.name, kd, info.label_names, (me, count)))
        sources = [resolved if s.selected else s for s in sources]
        _build_blocks([resolved], me, count, teacher, kd, out, budget)
    resolved = all(s.selection is not None for s in sources if s.selected)
    complete = resolved and all(_done(out, s, k) for s in sources for k in range(s.members.num_blocks))
    if complete and not (out / MANIFEST).is_file():
        write_json(out / MANIFEST, _manifest(identity, sources, out, kd))
        log.info("distill.build: all blocks built; wrote %s", out / MANIFEST)
    return out


def preflight(cfg, kd: dict) -> tuple[DatasetInfo, Teacher]:
    """Every problem the build can see before it writes anything (`_build.json` included), at once; the data and
    the teacher it read."""
    problems = Problems("the build could start")
    if not kd["sets"]:
        problems.add("kd.sets is not set: pass kd.sets=DIR, where the labelled views are written")
    if kd["storage"] not in ("params", "pixels"):
        problems.add(f"kd.storage={kd['storage']!r}: choose params (~72 bytes a view, replayed from the shards) or "
                     f"pixels (the views' JPEGs)")
    if kd["method"] != "soft_target":
        problems.add(f"kd.method={kd['method']!r} labels each batch online: only the MNv4 recipe (kd=mnv4) is built")
    info = None
    with problems.collect():
        info = prepare_dataset(cfg.data.root)
    teacher = check_inputs(kd, info, problems, building=True)
    problems.raise_if_any()
    return info, teacher


def _build_blocks(sources: list[SourceConfig], me: int, count: int, teacher: Teacher, kd: dict, out: Path,
                  budget: list) -> None:
    """Label this share's unfinished blocks of `sources` (block n of the list goes to share n mod count)."""
    tasks = [Task(i, k) for i, s in enumerate(sources) for k in range(s.members.num_blocks)]
    todo = [Task(t.source, t.block, views_done(out / sources[t.source].name, t.block))
            for n, t in enumerate(tasks) if n % count == me and not _done(out, sources[t.source], t.block)]
    if budget[0] is not None:
        todo, budget[0] = todo[:budget[0]], max(0, budget[0] - len(todo))
    log.info("distill.build %s: %d blocks, %d for share %d of %d still to build -> %s",
             "+".join(s.name for s in sources), len(tasks), len(todo), me, count, out)
    if todo:
        _label(todo, sources, teacher, kd, out)


def _claim(out: Path, identity: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = out / BUILD_FILE
    if existing.is_file():
        before = read_json(existing)
        if before != identity and not any(p.name != BUILD_FILE for p in out.iterdir()):
            log.info("%s: nothing was built under its earlier configuration; it now holds this one", out)
            write_json(existing, identity)
        elif before != identity:
            diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise KDSetError(f"{out} holds kd sets built with another configuration (differs in {', '.join(diff)}): "
                             f"build into a new kd.sets directory, or delete this one")
    else:
        write_json(existing, identity)


def _done(out: Path, s: SourceConfig, block: int) -> bool:
    return block_path(out / s.name, block).is_file()


def _label(todo: list[Task], sources: list[SourceConfig], teacher: Teacher, kd: dict, out: Path) -> None:
    b = kd["build"]
    device = resolve_device(b["device"])
    teacher.to(device)
    autocast = autocast_bf16(device, b["precision"])
    top_k = min(int(kd["top_k"]), len(teacher.label_names))
    renderer = ViewRenderer(sources, todo, int(kd["seed"]), teacher.img_size, teacher.interpolation,
                            int(b["batch_size"]), int(b["checks_per_block"]), kd["storage"])
    loader = DataLoader(renderer, batch_size=None, num_workers=int(b["num_workers"]),
                        worker_init_fn=init_loader_worker, pin_memory=device.type == "cuda")
    writers: dict[int, BlockWriter] = {}
    total = sum(sources[t.source].replicas * sources[t.source].members.block_size(t.block) - t.start for t in todo)
    bar = tqdm(total=total, unit="view", desc="distill.build", smoothing=0.05, mininterval=2,
               disable=not sys.stderr.isatty() and not os.environ.get("KD_PROGRESS"))
    start = time.time()
    for chunk in loader:
        task = todo[chunk["task"]]
        s = sources[task.source]
        if chunk["task"] not in writers:
            writers[chunk["task"]] = BlockWriter(out / s.name, s, task.block, s.members.block_size(task.block),
                                                 record_dtype(s.recipe.dtype, len(teacher.label_names), top_k),
                                                 kd["storage"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            probs = teacher.probabilities(chunk["images"].to(device, non_blocking=True))
        top = probs.topk(min(top_k, probs.size(1)), dim=1)
        writer = writers[chunk["task"]]
        writer.add(chunk, top.indices.cpu().numpy(), top.values.float().cpu().numpy())
        bar.update(len(chunk["views"]))
        if writer.remaining == 0:  # the writer has renamed the block's files into place
            del writers[chunk["task"]]
    bar.close()
    log.info("distill.build: %d views in %.1f s (%.1f views/s)", total, time.time() - start,
             total / max(1e-9, time.time() - start))


def _manifest(identity: dict, sources: list[SourceConfig], out: Path, kd: dict) -> dict:
    per_source = {}
    for s in sources:
        members = s.members.count
        views = members * s.replicas
        files = list((out / s.name).glob("block-*.npy")) + list((out / s.name).glob("block-*.tar"))
        per_source[s.name] = {"members": members, "views": views, "blocks": s.members.num_blocks,
                              "bytes": sum(f.stat().st_size for f in files),
                              "bytes_per_view": sum(f.stat().st_size for f in files) / max(1, views)}
    manifest = {**identity, "counts": per_source, "versions": versions(), "format": 1}
    if any(s.selected for s in sources):
        manifest["d3_classes"] = read_json(out / "d3" / "class_counts.json")
    return manifest


def main() -> None:
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=TRAIN_CONFIG)
    def _run(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            build(cfg)
        except UserError as e:  # bad input: the message says what to fix, without a stack trace
            log.error("%s", e)
            sys.exit(2)
        finally:  # the build writes into kd.sets only: the run directory Hydra made for it goes
            remove_if_empty(Path(HydraConfig.get().runtime.output_dir))

    _run()


if __name__ == "__main__":
    main()
