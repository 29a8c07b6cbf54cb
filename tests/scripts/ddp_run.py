"""A tiny Lightning run on shards that dumps what each rank saw, for tests/test_ddp.py (see tests/helpers/ddp_fit.py).

    python tests/scripts/ddp_run.py --root SHARDS --out DIR --devices 2 --mode fit
    python tests/scripts/ddp_run.py --root SHARDS --out DIR --devices 1 --mode validate --ckpt DIR/ckpt/last.ckpt

`fit` trains one epoch (DDP over gloo when --devices > 1), then validates the last checkpoint with the same
processes; `validate` only validates a checkpoint. Each rank writes DIR/<mode>-<devices>-rank<r>.json. Lightning's
DDP launcher re-executes this script once per extra rank, as it would for a user's training script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "helpers"), str(TESTS.parent)]  # the test helpers; the repo, when not pip-installed

from ddp_fit import run  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--mode", choices=("fit", "validate"), default="fit")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--num-workers", type=int, default=2)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    run(args.root, args.out, args.devices, args.mode, args.ckpt, args.num_workers)


if __name__ == "__main__":
    main()
