"""The console of a run: one line per event a person reads, and the known noise of the libraries filtered here.

Lines: the start (what trains on what, where), progress, one line per validation, the export, one final line
saying where everything is. Warnings and errors are marked. What is filtered, each with its reason, is below: a
warning a user can act on is never in these lists. `conf/hydra/job_logging/console.yaml` installs the formatter
and the filter; `open_log_file` adds `<run dir>/train.log` (the same lines, timed) once the start passed its
preflight.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from data_pipes.launch import this_process

# (message pattern, why it is noise for our runs)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"The `srun` command is available on your system but is not used",
     "train.cluster.topology reads Slurm launches itself; outside srun (a login node, sbatch's batch step) it is "
     "right not to use srun"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning's own use of torch; nothing to change"),
    (r"You have overridden `on_after_batch_transfer` in `LightningModule`",
     "on purpose: batches are normalised on the device after the copy (train.module)"),
    (r"Your `IterableDataset` has `__len__` defined",
     "the shard stream plans each worker's share itself, so its length is exact with any number of workers"),
    (r"It is recommended to use `self.log\(.*sync_dist=True",
     "the values logged without sync_dist are sums and counts already reduced over ranks by torchmetrics"),
    (r"Checkpoint directory .* exists and is not empty",
     "a resumed run writes into its own checkpoint directory; train.cluster.resume checks that it is its own"),
    (r"could not find the monitored key in the returned metrics",
     "step checkpoints between validations have no val/acc1 yet; best.ckpt is chosen at validations"),
)
# Lightning's INFO lines that the run's own start and end lines say better.
KNOWN_LOG_LINES: tuple[tuple[str, str], ...] = (
    (r"^💡 Tip:", "an advertisement"),
    (r"^(GPU|TPU|HPU) available:", "the start line names the device the run uses"),
    (r"^Seed set to", "the start line names the seed"),
    (r"^`Trainer\.fit` stopped:", "the final line says how the run ended"),
    (r"^You are using a CUDA device .* that has Tensor Cores",
     "precision is chosen by the run's precision setting (bf16-mixed where the GPU has it)"),
    (r"^(LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|-{10,}$|distributed_backend=|All distributed processes registered)",
     "the start line names the processes (each rank's `Initializing distributed` line stays: it shows who joined)"),
)
# Lightning prefixes its lines with "[rank: N] " in multi-process runs.
_NOISE = re.compile("|".join([rf"(?:^(?:\[rank: \d+\] )?{p.lstrip('^')})" for p, _ in KNOWN_LOG_LINES]
                             + [f"(?:{p})" for p, _ in KNOWN_WARNINGS]), re.M)


def quiet_known_warnings() -> None:
    """Ignore the warnings of KNOWN_WARNINGS (each with its reason there)."""
    for pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")


class KnownNoise(logging.Filter):
    """Drops the log records of KNOWN_LOG_LINES and KNOWN_WARNINGS (Lightning logs some warnings as records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _NOISE.search(record.getMessage()) is None


class ConsoleFormatter(logging.Formatter):
    """`message` for information, `WARNING: message` and `ERROR: message` for the rest; no logger names or
    timestamps on the console (train.log has them)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def install(handler: logging.Handler | None = None) -> None:
    """The noise filter on every root handler (or on `handler`), and the warning filters; idempotent."""
    quiet_known_warnings()
    for h in [handler] if handler is not None else logging.getLogger().handlers:
        if not any(isinstance(f, KnownNoise) for f in h.filters):
            h.addFilter(KnownNoise())


def open_log_file(run_dir: Path) -> logging.Handler:
    """`<run dir>/train.log`: every line of the console, timed, appended across restarts of the run."""
    handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    install(handler)
    logging.getLogger().addHandler(handler)
    return handler


class RunLog:
    """`<run dir>/train.log` for one start (`open` once the preflight passed; rank 0 only), closed on exit."""

    def __init__(self) -> None:
        self.handler: logging.Handler | None = None

    def open(self, run_dir: Path) -> None:
        if this_process().rank == 0 and self.handler is None:
            self.handler = open_log_file(run_dir)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None
