"""One pass over validation batches through several runtimes of the same network: each one's top-1/top-5 and its
top-1 agreement and max |logit difference| against a reference (every runtime sees the same pixels)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from data_pipes.errors import UserError
from train.nets.normalize import normalize


def measure(models: Mapping[str, Callable[[Tensor], Tensor]], reference: str, batches: Iterable[Mapping[str, Any]],
            *, mean: Sequence[float], std: Sequence[float], num_classes: int,
            decided_margin: float | None = None) -> dict[str, dict[str, float]]:
    """Top-1/top-5 of every model over the valid images, and each one's top-1 agreement and max |logit
    difference| against `reference`, in one pass over the batches. A model is any callable from normalised CPU
    images (NCHW float) to logits; it moves them where it runs. Memory: one batch of logits per model.

    With `decided_margin`, also the share of images the reference decides (its top-2 logits more than that apart:
    `decided`, %) and each model's agreement on those alone (`agree_decided`, %; NaN if none is decided). An int8
    model's logits move in steps of its output scale: where its two best classes are within one step, a runtime whose
    integer kernels round one of them differently picks the other, though it is off by no more than a step."""
    k = min(5, num_classes)
    stats = {name: {"hits1": 0, "hits5": 0, "agree": 0, "agree_decided": 0, "max_diff": 0.0} for name in models}
    seen = decided = 0
    with torch.inference_mode():
        for batch in batches:
            valid = batch["valid"].to(torch.bool)
            if not valid.any():
                continue
            x, target = normalize(batch["image"][valid], mean, std), batch["target"][valid]
            logits = {name: run(x).float().cpu() for name, run in models.items()}
            ref = logits[reference]
            sure = _decided(ref, decided_margin)
            for name, out in logits.items():
                top = out.topk(k, dim=1).indices
                s = stats[name]
                s["hits1"] += int((top[:, 0] == target).sum())
                s["hits5"] += int((top == target[:, None]).any(dim=1).sum())
                same = out.argmax(1) == ref.argmax(1)
                s["agree"] += int(same.sum())
                s["agree_decided"] += int((same & sure).sum())
                s["max_diff"] = max(s["max_diff"], float((out - ref).abs().max()))
            seen += int(valid.sum())
            decided += int(sure.sum())
    if seen == 0:
        raise UserError("the validation batches held no valid image: check the val split of the data root")
    out = {name: {"top1": 100.0 * s["hits1"] / seen, "top5": 100.0 * s["hits5"] / seen,
                  "agree": 100.0 * s["agree"] / seen, "max_diff": s["max_diff"], "images": seen}
           for name, s in stats.items()}
    if decided_margin is not None:
        for name, s in stats.items():
            out[name]["decided"] = 100.0 * decided / seen
            out[name]["agree_decided"] = 100.0 * s["agree_decided"] / decided if decided else float("nan")
    return out


def _decided(logits: Tensor, margin: float | None) -> Tensor:
    """Which rows have their top-2 logits more than `margin` apart (all of them without a margin or a second class)."""
    if margin is None or logits.shape[1] < 2:
        return torch.ones(logits.shape[0], dtype=torch.bool)
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > margin
