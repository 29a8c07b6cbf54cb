"""`python -m train [overrides]`: compose the Hydra config and call `train.run.train`."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_pipes.errors import UserError
from train.cluster.requeue import Requeued, Stopped
from train.nets.configs import CONF_DIR, TRAIN_CONFIG, remove_if_empty
from train.preflight import command_line_problem
from train.run import train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=TRAIN_CONFIG)
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Stopped as e:  # checkpointed on a signal (and requeued under Slurm, for a requeue signal)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's or scancel's SIGTERM: we are leaving anyway
        if isinstance(e, Requeued):  # not a failure
            log.info("%s", e)
            return
        log.warning("%s", e)  # the exit status a process killed by that signal would have
        sys.exit(128 + (e.signum or signal.SIGTERM))
    except UserError as e:  # bad input, not a bug: say what is wrong and how to fix it, without a stack trace
        log.error("%s", e)
        remove_if_empty(Path(str(cfg.run_dir)))
        sys.exit(2)


if __name__ == "__main__":
    problem = command_line_problem(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
