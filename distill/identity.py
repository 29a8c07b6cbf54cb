"""What makes two builds of kd sets (or a build and the run that trains on it) mean the same views.

A build writes its identity to `_build.json` when it starts (a build with another configuration is refused in the
same directory) and into `manifest.json` when it ends; a training run recomputes it from its own config and compares
(`distill.reader`). Values are JSON values, so an identity compares equal to what a manifest read back holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import albumentations
import cv2
import numpy as np
import PIL
import simplejpeg
import torch

from data_pipes.shards.metadata import info_sha256
from distill.sources import SourceConfig
from distill.teacher import Teacher


def versions() -> dict[str, str]:
    """Libraries whose output a replayed view depends on (decoder, resize and augmentation kernels)."""
    return {"simplejpeg": simplejpeg.__version__, "opencv": cv2.__version__,
            "albumentations": albumentations.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__}


def selection_identity(kd: Mapping[str, Any]) -> dict[str, Any]:
    """D3's selection settings: a selection made with other ones is another set of members."""
    d3 = kd["sources"]["d3"]
    return {"selector": d3.get("selector") or "teacher", "threshold": float(d3["threshold"]),
            "per_class": int(d3["per_class"])}


def build_identity(kd: Mapping[str, Any], sources: Sequence[SourceConfig], teacher: Teacher, size: int,
                   label_names: Sequence[str]) -> dict[str, Any]:
    """The teacher, the classes, the storage and every source's shards, recipe, replicas (and D3's selection)."""
    return json_values({
        "teacher": teacher.identity,
        "label_names": list(label_names),
        # top_k beyond the class count stores every class (distill.build says so once)
        "storage": kd["storage"], "top_k": min(int(kd["top_k"]), len(label_names)), "seed": int(kd["seed"]),
        "view_size": size,
        "sources": {s.name: {"index": s.index, "root": str(s.root), "info_sha256": info_sha256(s.root),
                             "replicas": s.replicas, "labelled": s.labelled, "recipe": _recipe_dict(s)}
                    | ({"selection": selection_identity(kd)} if s.selected else {})
                    for s in sources},
    })


def json_values(value: Any) -> Any:
    """`value` as it reads back from a JSON file (tuples become lists, keys sorted), so that the two compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def _recipe_dict(s: SourceConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s.recipe).items()}
