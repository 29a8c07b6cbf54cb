"""How far does the DCT-reduced eval decode move top-1 from the standard eval pixels?

    python -m bench.eval_decode --export .cache/evidence/qat/mnv3_s_100/float/export     # its own resolution
    python -m bench.eval_decode --export runs/.../export --img-size 160 --upscale 500

One trained model (an export dir of ours), its val top-1/top-5 twice per photo set: with the standard eval pixels
(full JPEG decode, resize of the shorter side to img/crop_pct, centre crop: timm's validate.py, our default) and
with `data.eval_dct_reduce=true` (libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale where the resized size allows,
then the same resize and crop). Photo sets: the val split as stored (Imagenette: 224 px photos) and re-encoded at
--upscale px on the shorter side (ImageNet's photos are ~400x350: where the reduction applies at 224-px eval
sizes and below). The table gives, per set, the DCT scale used, both top-1s, the difference, and the mean absolute
pixel difference between the two decodes' crops.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_CACHE, DEFAULT_SRC, machine_summary, prepare_slice


def _factors(folder: Path, img_size: int, crop_pct: float) -> Counter:
    """How many val photos the reduced decode reads at each DCT scale (headers only)."""
    from data_pipes.image.decode import _reduction, eval_resize_size, open_image

    counts: Counter = Counter()
    for path in sorted(folder.glob("*/*")):
        src = open_image(path.read_bytes())
        new_w, new_h = eval_resize_size(src.width, src.height, img_size, crop_pct)
        counts[_reduction(src.width, src.height, new_w, new_h) if src.is_jpeg else 1] += 1
    return counts


def _pixel_diff(folder: Path, img_size: int, crop_pct: float, interpolation: str, limit: int = 200) -> float:
    from data_pipes.image.augment import build_eval_transform

    full = build_eval_transform(img_size, crop_pct, interpolation, dct_reduce=False)
    reduced = build_eval_transform(img_size, crop_pct, interpolation, dct_reduce=True)
    diffs = [np.abs(full(p.read_bytes()).astype(int) - reduced(p.read_bytes()).astype(int)).mean()
             for p in sorted(folder.glob("*/*"))[:limit]]
    return float(np.mean(diffs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="an export dir of ours (config.json, weights)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageNet-layout photos (val/ is used)")
    p.add_argument("--img-size", type=int, default=None, help="eval resolution (default: the export's)")
    p.add_argument("--upscale", type=int, default=500, help="also the val photos re-encoded at this shorter side")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from data_pipes.image.augment import build_eval_transform
    from data_pipes.stream.datamodule import build_eval_loader
    from train.export import evaluate
    from train.nets.load import load_exported

    config = json.loads((args.export / "config.json").read_text())["pretrained_cfg"]
    img_size = args.img_size or int(config["input_size"][-1])
    crop_pct, interpolation = float(config["crop_pct"]), str(config["interpolation"])
    model = load_exported(args.export)
    sets = [("as stored", None), (f"re-encoded at {args.upscale} px", args.upscale)]
    print(f"machine: {machine_summary(torch.device('cpu'))}")
    print(f"model: {args.export} ({config.get('architecture', '')}), eval at {img_size} px, crop_pct {crop_pct}, "
          f"{interpolation}")
    lines = ["| val photos | images | DCT scale of the reduced decode | top-1 standard | top-1 reduced | difference "
             "| top-5 standard | top-5 reduced | mean abs pixel difference |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for title, upscale in sets:
        data = prepare_slice(args.src, args.cache_dir, train_per_class=1, val_per_class=10**6, upscale=upscale,
                             workers=args.workers)
        results = {}
        for reduce in (False, True):
            transform = build_eval_transform(img_size, crop_pct, interpolation, dct_reduce=reduce)
            loader = build_eval_loader(str(data.shards), transform, batch_size=args.batch_size,
                                       num_workers=args.workers, max_bad_fraction=0.0)  # every photo decodes
            results[reduce] = evaluate(model, loader, mean=config["mean"], std=config["std"])
        factors = _factors(data.images / "val", img_size, crop_pct)
        scale = ", ".join(f"1/{f}: {n}" for f, n in sorted(factors.items()))
        full, reduced = results[False], results[True]
        lines.append(f"| {title} | {full['val_images']} | {scale} | {full['top1']:.2f} | {reduced['top1']:.2f} | "
                     f"{reduced['top1'] - full['top1']:+.2f} | {full['top5']:.2f} | {reduced['top5']:.2f} | "
                     f"{_pixel_diff(data.images / 'val', img_size, crop_pct, interpolation):.2f} |")
        print(lines[-1], flush=True)
    print("\n".join(["", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
