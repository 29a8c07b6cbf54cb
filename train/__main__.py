"""`python -m train [overrides]`: compose the Hydra config and call `train.run.train`."""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from data_pipes.shards.metadata import DatasetError
    from distill.kdset import KDSetError
    from distill.teacher import TeacherError
    from train.models import ModelConfigError
    from train.quant.backend import QuantError
    from train.requeue import Requeued, Stopped
    from train.run import train

    try:
        train(cfg)
    except Stopped as e:  # checkpointed on a signal (and requeued under Slurm, for a requeue signal)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's or scancel's SIGTERM: we are leaving anyway
        if isinstance(e, Requeued):  # not a failure
            log.info("%s", e)
            return
        log.warning("%s", e)  # the exit status a process killed by that signal would have
        sys.exit(128 + (e.signum or signal.SIGTERM))
    except (DatasetError, ModelConfigError, TeacherError, KDSetError, QuantError, NotImplementedError) as e:
        # Bad input, not a bug: say what is wrong and how to fix it, without a stack trace.
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
