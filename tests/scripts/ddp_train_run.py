"""`train.run.train` under DDP, recording what each rank trained on and ended with, for tests of distillation and
QAT under DDP.

    python tests/scripts/ddp_train_run.py OUT [train overrides...]

Each rank writes OUT/rank<r>.json: its batches' sample keys (and kd sources, when distilling) and a fingerprint of
its final network (the sum of every tensor in its state_dict, by name). Lightning's DDP launcher re-executes this
script once per extra rank, as it would for a user's training script.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo, when not pip-installed

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from train.nets.configs import compose_config  # noqa: E402
from train.run import train  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # What this rank's dropout, drop-path (torch) and Mixup/CutMix (numpy) will draw from: digests, not draws.
        self.rng = [hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
                    hashlib.sha256(np.random.get_state()[1].tobytes()).hexdigest()[:16]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "keys": list(batch["key"]), "rng": self.rng}
        if "source" in batch:
            record["source"] = batch["source"].tolist()
        self.batches.append(record)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: float(v.double().sum()) for k, v in pl_module.model.state_dict().items() if v.numel()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
             "state": state}))


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    train(compose_config(overrides), callbacks=[Recorder(out)])


if __name__ == "__main__":
    main()
