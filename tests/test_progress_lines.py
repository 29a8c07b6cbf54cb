"""Without a terminal (a Slurm job's log), progress is plain lines every logging interval, not a carriage-return bar."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_run_without_a_tty_prints_one_plain_line_per_logging_interval_and_per_validation(tmp_path,
                                                                                          synthetic_shards, capfd):
    from hydra import compose, initialize_config_dir

    from train.run import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"run_dir={tmp_path}", f"data.root={synthetic_shards}", "model=mnv3_s_075", "data.img_size=32",
            "data.batch_size=16", "data.num_workers=1", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "callbacks.progress_bar=true",
            "logger.wandb.enabled=false", "export=false"])
    train(cfg)
    out = capfd.readouterr().out
    assert "\r" not in out
    steps = re.findall(r"^epoch (\d)/2 step (\d+)/24 \| [\d,]+ img/s \| loss [\d.]+ \| lr \S+ \| ETA \d+:\d\d:\d\d$",
                       out, flags=re.M)
    assert [int(s) for _, s in steps] == [4, 8, 12, 16, 20, 24], out[-2000:]  # 12 steps an epoch, every 4
    assert len(re.findall(r"^epoch [12]/2 val: acc1 [\d.]+ acc5 [\d.]+ \(best [\d.]+\)$", out, flags=re.M)) == 2
