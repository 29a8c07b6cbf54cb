"""The zoo: each model config's measured params and MACs beside the paper's (`python -m train.zoo` prints it).

Params are counted with the 1000-class ImageNet head, as the papers count them; MACs with torch's FlopCounterMode
on one image at the paper's resolution (`train.nets.macs.count_macs`). Models are built on the meta device: the counter
needs only shapes, so the whole zoo takes seconds. Where either number differs from the paper by more than 5%, the
config's `zoo_note` says why.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch

from train.nets.configs import list_model_configs, load_model_config
from train.nets.macs import count_macs
from train.nets.registry import create_model

NOTE_THRESHOLD_PCT = 5.0
GENERIC_CONFIG = "timm"  # conf/model/timm.yaml names no model of its own
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ZooEntry:
    name: str
    timm_name: str
    resolution: int
    params_m: float
    macs_m: float
    paper_top1: float
    paper_params_m: float
    paper_macs_m: float
    note: str | None

    @property
    def params_diff_pct(self) -> float:
        return pct_diff(self.params_m, self.paper_params_m)

    @property
    def macs_diff_pct(self) -> float:
        return pct_diff(self.macs_m, self.paper_macs_m)

    @property
    def differs(self) -> bool:
        return max(abs(self.params_diff_pct), abs(self.macs_diff_pct)) > NOTE_THRESHOLD_PCT


def pct_diff(measured: float, paper: float) -> float:
    """How far `measured` is from `paper`, in % of the paper's number."""
    return 100.0 * (measured - paper) / paper


def zoo_keys() -> list[str]:
    """Every model config that names a model (all of conf/model/ but timm.yaml)."""
    return [key for key in list_model_configs() if key != GENERIC_CONFIG]


def paper_points() -> list[dict[str, float | str]]:
    """Every zoo model's published numbers (key, family, top-1, MACs M, params M, resolution), from its config alone
    (nothing is built): the reference points of `python -m train.compare`'s charts."""
    points = []
    for key in zoo_keys():
        cfg = load_model_config(key)
        points.append({"key": key, "family": str(cfg.family), "top1": float(cfg.paper.top1),
                       "macs_m": float(cfg.paper.macs_m), "params_m": float(cfg.paper.params_m),
                       "resolution": int(cfg.paper.resolution)})
    return points


def measure(key: str) -> ZooEntry:
    """Build the config's model with a 1000-class head and count its params and MACs at the paper's resolution."""
    cfg = load_model_config(key)
    paper_resolution = int(cfg.paper.resolution)
    with torch.device("meta"):
        model = create_model(str(cfg.name), num_classes=IMAGENET_CLASSES)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, paper_resolution)
    return ZooEntry(
        name=key,
        timm_name=str(cfg.name),
        resolution=int(cfg.resolution),
        params_m=round(params / 1e6, 3),
        macs_m=round(macs / 1e6, 1),
        paper_top1=float(cfg.paper.top1),
        paper_params_m=float(cfg.paper.params_m),
        paper_macs_m=float(cfg.paper.macs_m),
        note=None if cfg.zoo_note is None else str(cfg.zoo_note),
    )


def format_table(entries: list[ZooEntry]) -> str:
    """A fixed-width table, then the zoo_note of every row that differs from the paper by more than 5% (marked *)."""
    head = (f"{'key':<14} {'timm name':<33} {'res':>4} {'params M':>9} {'paper':>6} {'diff':>7}  "
            f"{'MACs M':>8} {'paper':>6} {'diff':>7}  {'paper top-1':>11}")
    lines = [head, "-" * len(head)]
    for e in entries:
        mark = "*" if e.differs else ""
        lines.append(f"{e.name:<14} {e.timm_name:<33} {e.resolution:>4} {e.params_m:>9.3f} {e.paper_params_m:>6g} "
                     f"{e.params_diff_pct:>+6.1f}%  {e.macs_m:>8.1f} {e.paper_macs_m:>6g} {e.macs_diff_pct:>+6.1f}%  "
                     f"{e.paper_top1:>11.1f} {mark}".rstrip())
    notes = [_note_lines(e) for e in entries if e.differs]
    if notes:
        lines += ["", f"* differs from the paper by more than {NOTE_THRESHOLD_PCT:g}%:"]
        lines += [line for note in notes for line in note]
    return "\n".join(lines)


def _note_lines(entry: ZooEntry) -> list[str]:
    note = entry.note or f"(no zoo_note yet: explain the difference in conf/model/{entry.name}.yaml)"
    return textwrap.wrap(note, width=118, initial_indent=f"  {entry.name}: ", subsequent_indent="    ")
