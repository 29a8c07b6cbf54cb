"""Run timm's own `train.py` as the peer of a benchmark, timed without touching its loop.

    python -m bench.timm_peer --script .cache/timm/train.py --batch-size 32 --warmup 10 --steps 40 \
        --out result.json -- <train.py's own arguments>

timm's train.py runs unchanged, as `python train.py ...` would run it (`runpy`, `__main__`), at its default log
interval. The clock is a global optimizer-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`):
it starts after the `--warmup`-th update and stops after `--warmup + --steps`, the device synchronised at both
ends, then writes images/s to `--out` and ends the process (validation and checkpointing never start). With
`--steps 0` the script runs to its end (a whole training run: what the accuracy comparison reads from its
`summary.csv`).

timm's train.py is not in timm's wheel or sdist: `make timm-train` copies it from a timm checkout (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepClock:
    """Counts optimizer updates; times `steps` of them after `warmup`, then calls `done(images_per_second)`."""

    def __init__(self, *, warmup: int, steps: int, batch_size: int, sync, done) -> None:
        self.warmup, self.steps, self.batch_size = warmup, steps, batch_size
        self.sync, self.done = sync, done
        self.updates, self.start = 0, 0.0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.updates += 1
        if self.updates == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif self.updates == self.warmup + self.steps:
            self.sync()
            self.done(self.steps * self.batch_size / (time.perf_counter() - self.start))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m bench.timm_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--script", type=Path, required=True, help="timm's train.py")
    p.add_argument("--batch-size", type=int, required=True, help="the batch train.py is given (images per update)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="timed updates; 0: run the script to its end")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (as the other runner's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where to synchronise before reading the clock")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv[:split])
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def done(images_per_second: float) -> None:
        args.out.write_text(json.dumps({"images_per_second": images_per_second}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the timed steps are over: no validation, no checkpoint, no waiting for loader workers

    if args.steps:
        register_optimizer_step_post_hook(
            StepClock(warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, sync=sync, done=done))
    sys.argv = [str(args.script), *argv[split + 1:]]
    sys.path.insert(0, str(args.script.parent))
    runpy.run_path(str(args.script), run_name="__main__")
    if args.steps:
        raise SystemExit(f"{args.script} ended before {args.warmup + args.steps} updates: give it more data or "
                         f"fewer --warmup/--steps")
    args.out.write_text(json.dumps({"finished": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
