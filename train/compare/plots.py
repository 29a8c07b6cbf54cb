"""The charts of `python -m train.compare`, as PNG files, with the data behind each one in `plots.json`.

- `val_top1_vs_epoch.png`, `val_top1_vs_images_seen.png`: val top-1 curves on the axes that line up across batch
  sizes, device counts and accumulation (train.axes);
- `top1_vs_macs.png`: top-1 against MACs at the trained resolution, with the paper's points of the same models
  (and, with `zoo=True`, of the whole zoo) and the runs' Pareto front;
- `top1_vs_latency.png`: top-1 against batch-1 CPU latency in onnxruntime (1 thread, this machine), with the
  paper's top-1 of a run's model placed at the latency measured for it when the run used the paper's resolution;
- `float_vs_int8.png`: each int8 runtime's top-1 against the float model's, for runs with int8 exports.

Runs and the paper are often on different data (a 10-class slice against ImageNet-1k): the legend says which.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.compare.runs import RunData, dataset_label
from train.nets.zoo import paper_points

Series = dict[str, list[list[float]]]


def _pyplot():
    import matplotlib  # optional at import time: only charts need it (its import costs ~1 s)

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt  # optional at import time, as above

    return plt


def pareto_front(points: Sequence[Sequence[float]]) -> list[list[float]]:
    """The points no other point beats on both axes (lower x, higher y), by increasing x."""
    front: list[list[float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append([x, y])
    return front


def write_plots(runs: Sequence[RunData], out: Path, *, zoo: bool = False) -> dict[str, dict[str, Any]]:
    """Write every chart the runs have data for into `out`; returns (and writes as plots.json) each chart's series."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = f"runs: {dataset_label(runs)}"
    charts: dict[str, dict[str, Any]] = {}
    for key, label, file in (("epoch", "epoch", "val_top1_vs_epoch.png"),
                             ("images_seen", "training images seen (all devices)", "val_top1_vs_images_seen.png")):
        series = {r.name: [[row[key], row["val/acc1"]] for row in r.curve] for r in runs if r.curve}
        if series:
            charts[file] = _lines(series, out / file, xlabel=label, ylabel="val top-1 (%)",
                                  title=f"val top-1 against {label}", data=data,
                                  failed={r.name for r in runs if r.status == "failed"})
    charts["top1_vs_macs.png"] = _pareto(runs, out / "top1_vs_macs.png", x="model/macs_m", paper_x="macs_m",
                                         xlabel="MACs (millions, trained resolution)", zoo=zoo, data=data)
    if any(r.get("export/latency_ms_1thread") for r in runs):
        charts["top1_vs_latency.png"] = _pareto(runs, out / "top1_vs_latency.png", x="export/latency_ms_1thread",
                                                paper_x=None, xlabel="onnxruntime CPU latency, batch 1, 1 thread (ms)",
                                                zoo=False, data=data)
    int8 = [r for r in runs if any(r.get(f"int8/{k}_top1") is not None for k in ("pte", "onnx", "tflite"))]
    if int8:
        charts["float_vs_int8.png"] = _float_vs_int8(int8, out / "float_vs_int8.png", data=data)
    (out / "plots.json").write_text(json.dumps(charts, indent=2) + "\n")
    return charts


def _lines(series: Series, path: Path, *, xlabel: str, ylabel: str, title: str, data: str,
           failed: set[str] = frozenset()) -> dict[str, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for i, (name, points) in enumerate(series.items()):
        # Each run its own dash and marker as well as colour: two runs with the same points stay visible.
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], ls=LINESTYLES[i % len(LINESTYLES)],
                          marker=MARKERS[i % len(MARKERS)], markersize=4, lw=1.6, alpha=0.9,
                          label=f"{name} (failed)" if name in failed else name)
        if name in failed and points:  # where it stopped
            ax.scatter([points[-1][0]], [points[-1][1]], marker="x", s=80, color=line.get_color(), zorder=4)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(ax, title, data)
    return {**_save(fig, ax, path, series), "failed": sorted(failed & series.keys())}


def _pareto(runs: Sequence[RunData], path: Path, *, x: str, paper_x: str | None, xlabel: str, zoo: bool,
            data: str) -> dict[str, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=120)
    series: Series = {}
    labels: list[tuple[str, float, float, str]] = []
    ours = [r for r in runs if r.get(x) is not None and r.top1 is not None]
    for r in ours:
        failed = r.status == "failed"
        dot = ax.scatter([r.get(x)], [r.top1], s=60 if failed else 36, zorder=3, marker="x" if failed else "o",
                         label=f"{r.name} (failed)" if failed else r.name)
        labels.append((r.name, r.get(x), r.top1, dot.get_facecolor()[0] if not failed else "black"))
        series[r.name] = [[r.get(x), r.top1]]
    fronts = {}
    for i, (dataset, members) in enumerate(sorted(_by_dataset(ours).items())):
        front = pareto_front([[r.get(x), r.top1] for r in members])  # runs on other data are not comparable
        fronts[dataset] = front
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="black", lw=1,
                    ls=LINESTYLES[(i + 1) % len(LINESTYLES)], zorder=2, label=f"Pareto front, {dataset}")
    paper = _paper_points(runs, x, paper_x, zoo)
    if paper:
        where = ", paper resolution)" if paper_x else "; latency measured here)"
        ax.scatter([p[1] for p in paper], [p[2] for p in paper], marker="x", color="gray", zorder=2,
                   label=f"paper top-1 (ImageNet-1k{where}")
        labels += [(key, px, py, "gray") for key, px, py in paper]
        series["paper"] = [[px, py] for _, px, py in paper]
    if paper_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="top-1 (%)")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    _title(ax, f"top-1 against {xlabel.split(' (')[0]}", data)
    _place_labels(fig, ax, labels)
    front = next(iter(fronts.values())) if len(fronts) == 1 else []
    return {**_save(fig, ax, path, series, legend="lower right"), "front": front, "fronts": fronts}


def _paper_points(runs: Sequence[RunData], x: str, paper_x: str | None, zoo: bool) -> list[tuple[str, float, float]]:
    """(model, x, paper top-1): the runs' models (once each) or, with `zoo`, every zoo model."""
    points: dict[str, tuple[str, float, float]] = {}
    if zoo and paper_x:
        for p in paper_points():
            points[str(p["key"])] = (str(p["key"]), float(p[paper_x]), float(p["top1"]))
    for r in runs:
        key, top1 = r.run.get("model"), r.paper.get("top1")
        if key is None or top1 is None:
            continue
        if paper_x is not None and r.paper.get(paper_x) is not None:
            points.setdefault(key, (key, float(r.paper[paper_x]), float(top1)))
        elif paper_x is None and r.get(x) is not None and r.paper.get("resolution") == r.run.get("img_size"):
            points.setdefault(key, (key, float(r.get(x)), float(top1)))  # the architecture's latency, measured here
    return list(points.values())


def _float_vs_int8(runs: Sequence[RunData], path: Path, *, data: str) -> dict[str, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=120)
    series: Series = {}
    for runtime, key, marker in (("ExecuTorch", "int8/pte_top1", "o"), ("onnxruntime", "int8/onnx_top1", "s"),
                                 ("LiteRT", "int8/tflite_top1", "D"), ("PyTorch int8", "int8/torch_top1", "^")):
        points = [[float(r.get("int8/float_top1") or r.get("export/top1")), float(r.get(key))] for r in runs
                  if r.get(key) is not None and (r.get("int8/float_top1") or r.get("export/top1")) is not None]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=runtime, zorder=3)
            series[runtime] = points
    labels = [(r.name, r.get("int8/float_top1") or r.get("export/top1"), r.get("int8/pte_top1"), "black")
              for r in runs if (r.get("int8/float_top1") or r.get("export/top1")) is not None
              and r.get("int8/pte_top1") is not None]
    everything = [v for pts in series.values() for p in pts for v in p]
    lo, hi = min(everything) - 2, max(everything) + 2
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="int8 = float")
    ax.set(xlabel="float top-1 (%)", ylabel="int8 top-1 (%)", xlim=(lo, hi), ylim=(lo, hi))
    _title(ax, "int8 against float, each runtime", data)
    _place_labels(fig, ax, labels)
    return _save(fig, ax, path, series)


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _by_dataset(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        groups.setdefault(str(r.run.get("dataset") or "?"), []).append(r)
    return groups


def _title(ax: Any, what: str, data: str) -> None:
    """The chart's subject, and below it the data the runs were on, wrapped: a long list never runs off the
    figure's edges."""
    ax.set_title(what + "\n" + "\n".join(textwrap.wrap(data, 95)), fontsize=9)


def _place_labels(fig: Any, ax: Any, labels: Sequence[tuple[str, float, float, Any]]) -> None:
    """Label each point beside it without covering another label or leaving the axes: each label takes the first
    of a few positions around its point that is free (greedy, from left to right), else the one that covers the
    fewest pixels of the labels already placed."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox  # optional at import time, as matplotlib itself (see _pyplot)

    marks = [ax.transData.transform((x, y)) for _, x, y, _ in labels]  # labels keep off every point's marker
    taken: list[Any] = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in marks]
    spots = ((4, 4, "left", "bottom"), (4, -4, "left", "top"), (-4, 4, "right", "bottom"),
             (-4, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
             (4, 14, "left", "bottom"), (4, -14, "left", "top"))
    for text, x, y, color in sorted(labels, key=lambda item: (item[1], item[2])):
        best, best_overlap = None, None
        for dx, dy, ha, va in spots:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6, color=color,
                               ha=ha, va=va)
            box = note.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            overlap = sum(_area(box, t) for t in taken) + (0 if inside else 1e9)  # covered pixels; never outside
            if best is None or overlap < best_overlap:
                if best is not None:
                    best[0].remove()
                best, best_overlap = (note, box), overlap
            else:
                note.remove()
            if overlap == 0:
                break
        taken.append(best[1])


def _area(a: Any, b: Any) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _save(fig: Any, ax: Any, path: Path, series: Series, legend: str = "best") -> dict[str, Any]:
    """Grid, legend, the PNG; the chart's data for plots.json."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc=legend)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return {"series": series, "points": sum(len(p) for p in series.values())}
