"""`python -m train.zoo`: measured params/MACs of every model config beside the paper's, with reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.nets import count_macs, create_model
from train.nets.zoo import measure, zoo_keys
from train.zoo import main

REPO = Path(__file__).resolve().parents[1]
JSON_KEYS = {"name", "timm_name", "resolution", "params_m", "macs_m", "paper_top1", "paper_params_m", "paper_macs_m",
             "note"}


@pytest.fixture(scope="module")
def zoo_json() -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-m", "train.zoo", "--json"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True)
    return {row["name"]: row for row in json.loads(result.stdout)}


def pct(measured: float, paper: float) -> float:
    return 100.0 * abs(measured - paper) / paper


def test_zoo_json_has_every_model_config_with_exactly_the_documented_keys(zoo_json):
    assert sorted(zoo_json) == zoo_keys()
    assert "timm" not in zoo_json
    assert all(set(row) == JSON_KEYS for row in zoo_json.values())


def test_measured_params_of_mobilenetv2_match_the_published_count(zoo_json):
    row = zoo_json["mnv2_100"]
    assert pct(row["params_m"], row["paper_params_m"]) < 5.0, row


def test_measured_macs_of_mobilenetv3_large_match_the_published_217m(zoo_json):
    assert pct(zoo_json["mnv3_l_100"]["macs_m"], 217.0) < 10.0


def test_every_difference_over_5_percent_has_a_zoo_note(zoo_json):
    unexplained = [name for name, row in zoo_json.items()
                   if max(pct(row["params_m"], row["paper_params_m"]), pct(row["macs_m"], row["paper_macs_m"])) > 5.0
                   and not row["note"]]
    assert not unexplained


def test_table_marks_rows_over_5_percent_and_prints_their_reason(capsys):
    assert main(["mnv1_025", "mnv2_100"]) == 0
    out = capsys.readouterr().out
    row = {line.split()[0]: line for line in out.splitlines() if line.startswith("mnv")}
    assert row["mnv1_025"].rstrip().endswith("*") and not row["mnv2_100"].rstrip().endswith("*")
    assert "mnv1_025: Widths are exactly 0.25x" in out


def test_unknown_config_key_is_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mnv9_xl"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "mnv9_xl" in err and "mnv4_hybrid_l" in err


def test_counting_on_the_meta_device_gives_the_same_numbers_as_real_weights():
    # The zoo builds its models on the meta device; this pins that shortcut to a real model's count.
    real = create_model("mobilenetv4_hybrid_medium", num_classes=1000)
    entry = measure("mnv4_hybrid_m")
    assert entry.params_m == round(sum(p.numel() for p in real.parameters()) / 1e6, 3)
    assert entry.macs_m == round(count_macs(real, 256) / 1e6, 1)
