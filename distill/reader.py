"""Built kd sets, opened for training: complete, built for this run, and rendering the pixels they were built with.

`KDSets.open` refuses a set that is partly built (naming what is missing and how to resume), built with another
teacher, classes, source shards, recipe, replicas, storage or D3 selection (naming the difference), or whose views
no longer render to the checksums the build stored (naming the libraries that changed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipes.image.views import checksum
from data_pipes.stream.mixture import Item, SourceReader
from distill.identity import build_identity, versions
from distill.kdset import BUILD_FILE, MANIFEST, RESUME_HINT, KDSetError, block_path, read_json
from distill.select import Selection, missing_scores, with_selection
from distill.sources import SourceConfig
from distill.teacher import Teacher
from distill.views import StoredViews


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
        for s in sources:
            reader = SourceReader(s.members)
            views = StoredViews(s.recipe, reader, directory=self.root / s.name, replicas=s.replicas,
                                storage=self.storage, labelled=s.labelled)
            sums = read_json(block_path(self.root / s.name, 0, ".check.json"))
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
        if s.selected and not Selection.exists(root / s.name):
            scores = missing_scores(root / s.name, s.shards)
            parts.append(f"{s.name}: its class-balanced selection"
                         + (f" ({len(scores)} of {len(s.shards)} extra shards not scored yet)" if scores else ""))
            continue
        source = with_selection(s, Selection.load(root / s.name)) if s.selected else s
        missing[s.name] = [k for k in range(source.members.num_blocks) if not block_path(root / s.name, k).is_file()]
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


def settings_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The kd settings built kd sets record (their manifest), as `key -> value` with the config's keys."""
    out = {f"kd.{k}": manifest[k] for k in ("storage", "top_k", "seed", "view_size") if k in manifest}
    for name, source in manifest.get("sources", {}).items():
        out[f"kd.sources.{name}.replicas"] = source["replicas"]
        for key, value in (source.get("selection") or {}).items():  # D3: selector, threshold, per_class
            out[f"kd.sources.{name}.{key}"] = None if key == "selector" and value == "teacher" else value
    return out


def adopt_recorded(kd: dict[str, Any], explicit: set[str] | None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Training on built sets takes the settings they were built with for every key the command did not set
    (`explicit`: the command line's keys; None: none known). Returns (the kd settings, what was taken, the
    conflicts: an explicit value that differs from the recorded one, named with both values)."""
    if not kd.get("sets"):
        return kd, {}, []
    path = Path(str(kd["sets"])).expanduser() / MANIFEST
    manifest = read_json(path) if path.is_file() else {}
    recorded, classes = settings_of(manifest), len(manifest.get("label_names", []))
    kd, taken, conflicts = json.loads(json.dumps(kd)), {}, []
    for key, was in recorded.items():
        *parents, leaf = key.split(".")[1:]
        node = kd
        for part in parents:
            node = node.setdefault(part, {})
        now = node.get(leaf)
        if now == was or (leaf == "top_k" and isinstance(now, int) and min(now, classes) == was):
            continue  # a top_k beyond the class count was stored as the class count
        if explicit is not None and any(key == e or key.startswith(e + ".") for e in explicit):
            conflicts.append(f"kd.sets={kd['sets']} was built with {key}={was}, and this command sets {key}={now}: "
                             f"drop the override to train on these sets, or build new ones with it (python -m "
                             f"distill.build ... {key}={now} kd.sets=<a new directory>)")
            continue
        node[leaf] = was
        taken[key] = was
    return kd, taken, conflicts
