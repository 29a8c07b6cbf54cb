"""A small, learnable image dataset made on the spot, so the demo and tests need no download.

Each class is a shape (disc, square, triangle, bars, ring) in one of two colour families, drawn at a random
position, scale and rotation over a noisy background and saved as JPEG in ImageNet's folder layout
(`<out>/train/<class>/*.JPEG`, `<out>/val/<class>/*.JPEG`). A small CNN learns it to well above chance in a
minute on a CPU, and it exercises the same decode and augmentation path as real photos.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "bars", "ring")
PALETTES = {"warm": ((200, 40, 30), (240, 160, 20)), "cool": ((30, 70, 200), (20, 170, 120))}


def class_names(num_classes: int = 10) -> list[str]:
    names = [f"{palette}_{shape}" for palette in PALETTES for shape in SHAPES]
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in 2..{len(names)}, got {num_classes}")
    return names[:num_classes]


def render(label: str, size: int, rng: np.random.Generator) -> Image.Image:
    palette, shape = label.split("_")
    background = rng.integers(0, 256, size=3) * 0.35 + 80
    pixels = np.clip(background + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in np.clip(np.array(PALETTES[palette][rng.integers(2)]) + rng.normal(0, 20, 3), 0, 255))
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape in ("square", "triangle"):
        corners = 4 if shape == "square" else 3
        turns = [angle + 2 * math.pi * k / corners for k in range(corners)]
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in turns]
        draw.polygon(pts, fill=colour)
    else:  # bars
        for k in range(-2, 3):
            off = k * r / 2.2
            dx, dy = math.cos(angle) * off, math.sin(angle) * off
            ex, ey = -math.sin(angle) * r, math.cos(angle) * r
            ends = [(cx + dx - ex, cy + dy - ey), (cx + dx + ex, cy + dy + ey)]
            draw.line(ends, fill=colour, width=max(2, int(r / 6)))
    return img


def make_image_folder(
    out: str | Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 25,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write the dataset in ImageNet layout and return `out`. Existing complete output is reused."""
    out = Path(out)
    done = out / ".complete"
    if done.is_file():
        return out
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in class_names(num_classes):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                render(label, size, rng).save(folder / f"{label}_{split}_{i:05d}.JPEG", quality=90)
    done.write_text("ok\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_image_folder(args.out, num_classes=args.num_classes, train_per_class=args.train_per_class,
                      val_per_class=args.val_per_class, size=args.size, seed=args.seed)


if __name__ == "__main__":
    main()
