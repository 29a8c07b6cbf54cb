"""python -m train.compare RUN_DIR... [--out DIR] [--csv | --json] [--zoo]
   python -m train.compare --wandb ENTITY/PROJECT [--filter KEY=VALUE ...] [--out DIR]

Prints the runs side by side (markdown by default) and, with --out, writes the charts there (train.compare.plots).
RUN_DIR may be a glob: `python -m train.compare 'runs/**' --out cmp` compares every run under runs/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_pipes.errors import UserError
from train.compare import plots, table
from train.compare.runs import find_runs, load_run, parse_filters, unique_names, wandb_runs


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories or globs ('runs/**')")
    parser.add_argument("--out", default=None, help="write the charts (PNG) and plots.json here")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print the table as CSV")
    fmt.add_argument("--json", action="store_true", help="print every run's whole record as JSON")
    parser.add_argument("--zoo", action="store_true", help="the MACs chart also shows every zoo model's paper point")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None, help="read the runs from W&B (online)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="with --wandb: keep runs with this tag (tags=model:mnv4_conv_s, tags=distill:true) or "
                             "config value (recipe=paper)")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:
        parser.error("name run directories (or a glob such as 'runs/**'), or --wandb ENTITY/PROJECT")
    if args.filter and not args.wandb:
        parser.error("--filter selects W&B runs: use it with --wandb")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        runs = [load_run(path) for path in find_runs(args.runs)] if args.runs else []
        if args.wandb:
            runs += wandb_runs(args.wandb, parse_filters(args.filter))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = unique_names(runs)
    if args.json:
        print(table.to_json(runs))
    elif args.csv:
        print(table.to_csv(runs), end="")
    else:
        print(table.markdown(runs))
    if args.out:
        charts = plots.write_plots(runs, args.out, zoo=args.zoo)
        print(f"\ncharts in {args.out}: " + ", ".join(f"{name} ({c['points']} points)" for name, c in charts.items()),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
