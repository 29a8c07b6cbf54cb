"""Without a terminal (a Slurm job's log), progress is plain lines every logging interval, not a carriage-return bar."""

from __future__ import annotations

import re

import pytest
from conftest import compose_run

from train.run import train


@pytest.mark.slow
def test_a_run_without_a_tty_prints_one_plain_line_per_logging_interval_and_per_validation(tmp_path,
                                                                                          synthetic_shards, capfd):
    train(compose_run(f"run_dir={tmp_path}", f"data.root={synthetic_shards}", "data.batch_size=16",
                      "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "callbacks.progress_bar=true",
                      "export=false"))
    out = capfd.readouterr().out
    assert "\r" not in out
    steps = re.findall(r"^epoch (\d)/2 step (\d+)/24 \| [\d,]+ img/s \| loss [\d.]+ \| lr \S+ \| ETA \d+:\d\d:\d\d$",
                       out, flags=re.M)
    assert [int(s) for _, s in steps] == [4, 8, 12, 16, 20, 24], out[-2000:]  # 12 steps an epoch, every 4
    assert len(re.findall(r"^epoch [12]/2 val: acc1 [\d.]+ acc5 [\d.]+ \(best [\d.]+\)$", out, flags=re.M)) == 2
