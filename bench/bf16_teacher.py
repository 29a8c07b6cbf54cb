"""How far do bf16 teacher logits move the top-10 probabilities a kd set stores?

    python -m bench.bf16_teacher                                   # trains a small teacher on an Imagenette slice
    python -m bench.bf16_teacher --teacher runs/<teacher>/export --device cuda

`distill.build` runs the teacher under bf16 autocast on GPUs that have it (kd.build.precision=auto) and stores each
view's top-10 probabilities as uint16 (floor(p * 65535)). The softmax itself is always fp32 (`Teacher.probabilities`),
so what bf16 changes is the logits. This runs the same teacher on the same eval views twice, fp32 and bf16 autocast,
and compares what would be stored: the top-10 class sets and order, top-1, the stored probabilities (as floats and in
stored uint16 units), and KL(fp32 || bf16) over all classes. The teacher (an export dir of ours) defaults to a
MobileNetV3-Small trained here for a few epochs on real photos (cached).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import DEFAULT_CACHE, DEFAULT_SRC, machine_summary, pick_device, prepare_slice
from data_pipes.image.augment import build_eval_transform
from data_pipes.stream.datamodule import build_eval_loader
from distill.kdset import PROB_SCALE, quantize
from distill.teacher import load_teacher
from train.nets.configs import compose_config
from train.run import train

TOP_K = 10


def trained_teacher(src: Path, cache: Path, epochs: int) -> Path:
    """A MobileNetV3-Small trained on a 10-class slice of real photos, once (its export dir)."""
    data = prepare_slice(src, cache, train_per_class=100, val_per_class=20)
    run_dir = cache / f"bf16-teacher-{epochs}ep"
    if not (run_dir / "export" / "metrics.json").is_file():
        train(compose_config([f"run_dir={run_dir}", f"data.root={data.shards}", "model=mnv3_s_100",
                              "data.img_size=128", "data.batch_size=50", "data.num_workers=2",
                              "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.max_epochs={epochs}",
                              "optim.lr=4e-3", "sched.warmup_epochs=1", "callbacks.progress_bar=false",
                              "logger.wandb.enabled=false", "export_latency=false", "ckpt_path=null"]))
    return run_dir / "export"


def compare(teacher_dir: Path, shards: Path, device: torch.device, images: int) -> dict[str, float]:
    teacher = load_teacher(str(teacher_dir)).to(device)
    transform = build_eval_transform(teacher.img_size, crop_pct=teacher.data_config["crop_pct"],
                                     interpolation=teacher.interpolation, dct_reduce=False)
    loader = build_eval_loader(str(shards), transform, batch_size=100, num_workers=2, max_bad_fraction=0.0,
                               split="train")
    fp32, bf16 = [], []
    for batch in loader:
        x = batch["image"][batch["valid"]].to(device)
        fp32.append(teacher.probabilities(x).cpu())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16.append(teacher.probabilities(x).cpu())
        if sum(len(p) for p in fp32) >= images:
            break
    p32, p16 = torch.cat(fp32)[:images], torch.cat(bf16)[:images]
    k = min(TOP_K, p32.size(1))
    top32, top16 = p32.topk(k, dim=1), p16.topk(k, dim=1)
    same_set = (top32.indices.sort(dim=1).values == top16.indices.sort(dim=1).values).all(dim=1)
    stored32 = torch.from_numpy(quantize(top32.values.numpy()).astype("int64"))
    stored16 = torch.from_numpy(quantize(p16.gather(1, top32.indices).numpy()).astype("int64"))
    kl = (p32 * (p32.clamp_min(1e-12).log() - p16.clamp_min(1e-12).log())).sum(dim=1)
    same_top1 = top32.indices[:, 0] == top16.indices[:, 0]
    return {
        "views": len(p32), "classes": p32.size(1), "top1_agree_pct": 100.0 * float(same_top1.float().mean()),
        "same_topk_set_pct": 100.0 * float(same_set.float().mean()),
        "same_topk_order_pct": 100.0 * float((top32.indices == top16.indices).all(dim=1).float().mean()),
        "max_abs_dp": float((p32 - p16).abs().max()),
        "mean_abs_dp_topk": float((top32.values - p16.gather(1, top32.indices)).abs().mean()),
        "max_stored_units": int((stored32 - stored16).abs().max()), "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()), "top1_conf_mean": float(top32.values[:, 0].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=None, help="an export dir of ours (default: train one here)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--epochs", type=int, default=8, help="epochs of the default teacher")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    data = prepare_slice(args.src, args.cache_dir, train_per_class=100, val_per_class=20)
    teacher = args.teacher or trained_teacher(args.src, args.cache_dir, args.epochs)
    r = compare(teacher, data.shards, device, args.images)
    print(f"machine: {machine_summary(device)}")
    print(f"teacher: {teacher}; {r['views']} eval views of training photos, {r['classes']} classes, mean top-1 "
          f"probability {r['top1_conf_mean']:.3f}")
    print("| fp32 vs bf16 teacher logits | value |\n|---|---:|")
    rows = [("top-1 agreement (%)", f"{r['top1_agree_pct']:.2f}"),
            (f"same top-{TOP_K} class set (%)", f"{r['same_topk_set_pct']:.2f}"),
            (f"same top-{TOP_K} order (%)", f"{r['same_topk_order_pct']:.2f}"),
            ("max |dp| over all classes", f"{r['max_abs_dp']:.2e}"),
            (f"mean |dp| of the stored top-{TOP_K}", f"{r['mean_abs_dp_topk']:.2e}"),
            (f"max change of a stored value (uint16 units of 1/{PROB_SCALE})", f"{r['max_stored_units']}"),
            ("KL(fp32 || bf16), mean / max (nats)", f"{r['kl_mean']:.2e} / {r['kl_max']:.2e}")]
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
