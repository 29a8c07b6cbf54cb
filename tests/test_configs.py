"""Every config composes: each model, each group option, the experiments, and the distill/qat switches."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])


MODELS = [m for m in options("model") if m != "timm"]


def test_the_issue_lists_every_published_mobilenet_as_a_model_config():
    expected = {"mnv1_100", "mnv1_075", "mnv1_050", "mnv1_025", "mnv2_140", "mnv2_100", "mnv2_075", "mnv2_050",
                "mnv2_035", "mnv3_l_100", "mnv3_l_075", "mnv3_s_100", "mnv3_s_075", "mnv3_l_min", "mnv4_conv_s",
                "mnv4_conv_m", "mnv4_conv_l", "mnv4_hybrid_m", "mnv4_hybrid_l"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("switch", ["distill=true", "qat=true", "distill=false"])
def test_every_model_composes_with_distill_and_qat_switches(model, switch):
    cfg = compose_train(f"model={model}", switch)
    assert cfg.model.key == model
    assert OmegaConf.select(cfg, switch.split("=")[0]) is (switch.split("=")[1] == "true")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_any_timm_model_is_selectable_by_name():
    cfg = compose_train("model=timm", "model.name=efficientnet_b0")
    assert cfg.model.name == "efficientnet_b0"
    assert cfg.model.key == "efficientnet_b0"


@pytest.mark.parametrize("group", ["aug", "optim", "sched", "trainer", "logger", "callbacks", "kd", "data"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_starts_with_its_command(experiment):
    # Hydra reads the package header only from the very first lines; the command comes right after it.
    header, command = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()[:2]
    assert header == "# @package _global_"
    assert command.startswith("# python -m train") and f"experiment={experiment}" in command
    cfg = compose_train(f"experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)


def test_users_first_overrides_land_where_they_are_named():
    cfg = compose_train("trainer.max_epochs=3", "trainer.devices=2", "trainer.accelerator=cpu", "data.root=/d",
                        "data.batch_size=32", "data.num_workers=1", "data.img_size=160", "seed=7")
    assert (cfg.trainer.max_epochs, cfg.trainer.devices, cfg.trainer.accelerator) == (3, 2, "cpu")
    assert (cfg.data.root, cfg.data.batch_size, cfg.data.num_workers, cfg.data.img_size) == ("/d", 32, 1, 160)
    assert cfg.seed == 7


def test_no_config_group_shadows_the_distill_or_qat_switch():
    # Hydra treats any conf/<name>/ folder as a group, and then `distill=true` stops composing.
    assert not (CONF / "distill").exists() and not (CONF / "qat").exists()
