"""`python -m train.zoo [--json] [KEY ...]`: each model config's measured params and MACs beside the paper's.

Models are built on the meta device (the counter needs only shapes), so the whole zoo takes seconds; where either
number differs from the paper by more than 5%, the config's `zoo_note` says why (`train.nets.zoo`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from train.nets.zoo import format_table, measure, zoo_keys


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="*", metavar="KEY", help="model configs to measure (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.keys) - set(zoo_keys()))
    if unknown:
        parser.error(f"unknown model config(s) {', '.join(unknown)}; choose from: {', '.join(zoo_keys())}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    entries = [measure(key) for key in args.keys or zoo_keys()]
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
    else:
        print(format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
