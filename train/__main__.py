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
    except Requeued as e:  # checkpointed (and requeued under Slurm): not a failure
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's SIGTERM: we are leaving anyway
        log.info("%s", e)
        return
    except Stopped as e:  # checkpointed on SIGTERM: the exit status a process killed by that signal would have
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.warning("%s", e)
        sys.exit(128 + (e.signum or signal.SIGTERM))
    except (DatasetError, ModelConfigError, TeacherError, KDSetError, QuantError, NotImplementedError) as e:
        # Bad input, not a bug: say what is wrong and how to fix it, without a stack trace.
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
