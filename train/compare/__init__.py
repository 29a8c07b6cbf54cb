"""`python -m train.compare RUN_DIR... [--out DIR] [--csv | --json]`: runs side by side, and the charts users choose by.

Offline it reads our own run files (`summary.json`, `csv/metrics.csv` of each run directory): no account, no network.
Online (`--wandb ENTITY/PROJECT`, optional `--filter KEY=VALUE`) it reads the same values from W&B, where every run
logs them under the same keys. See `runs` (loading), `table` (the side-by-side table) and `plots` (the charts).
"""

from train.compare.runs import CompareError, RunData, find_runs, load_run

__all__ = ["CompareError", "RunData", "find_runs", "load_run"]
