"""A run stopped mid-epoch and resumed from its last checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from preemption import PreemptAt, Preemption

REPO = Path(__file__).resolve().parents[1]


def run(root: Path, run_dir: Path, *overrides: str, callbacks=()) -> dict[str, float]:
    from train.run import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"run_dir={run_dir}", f"data.root={root}", "model=mnv3_s_075", "data.img_size=32", "data.batch_size=16",
            "data.num_workers=2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=2",
            # No dropout: the global RNG is not part of a checkpoint, so dropout masks would differ after a resume.
            "model.drop_rate=0.0", "model.drop_path_rate=0.0", "ema.decay=0.9",
            "callbacks.checkpoint.every_n_train_steps=1", "callbacks.progress_bar=false",
            "logger.wandb.enabled=false", "export=false", *overrides,
        ])
    return train(cfg, callbacks=callbacks)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resuming_mid_epoch_continues_the_data_stream_and_reproduces_the_uninterrupted_run(tmp_path, synthetic_shards):
    uninterrupted = run(synthetic_shards, tmp_path / "a")

    # Killed 5 steps into the first epoch (12 steps), then requeued with ckpt_path=last into the same run dir.
    with pytest.raises(Preemption):
        run(synthetic_shards, tmp_path / "b", callbacks=[PreemptAt(5)])
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["global_step"] < 12  # mid-epoch
    resumed = run(synthetic_shards, tmp_path / "b", f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == \
        torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=lambda m, k=key: f"{k}: {m}")
    assert resumed["val/acc1"] == pytest.approx(uninterrupted["val/acc1"])
