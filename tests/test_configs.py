"""Every config composes: each model, each group option, the experiments, and the distill/qat switches."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf
from torch import nn

from train.nets.configs import CONF_DIR as CONF
from train.nets.configs import compose_config
from train.optim import optimizer_factory


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    """The config as users compose it (no test overrides)."""
    return compose_config(["run_dir=/tmp/unused", *overrides])


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


TABLE_9 = {"mnv4_conv_s": 75.5, "mnv4_conv_m": 82.7, "mnv4_conv_l": 85.9, "mnv4_hybrid_m": 83.7, "mnv4_hybrid_l": 86.6}


def _target(experiment: str) -> float:

    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    return float(re.search(r"^# Target: ([\d.]+) top-1", text, re.M).group(1))


@pytest.mark.parametrize("model", MODELS)
def test_every_published_model_has_its_paper_recipe_aiming_at_the_papers_number(model):
    cfg = compose_train(f"experiment={model}_paper")
    assert cfg.model.key == model and cfg.recipe == f"{model}_paper"
    assert _target(f"{model}_paper") == cfg.model.paper.top1
    # The recipe states its global batch, so that a run on another one scales lr by the stated rule.
    text = (CONF / "experiment" / f"{model}_paper.yaml").read_text()
    base = text + "".join(
        (CONF / "experiment" / f"{line.strip()[2:]}.yaml").read_text() for line in text.splitlines()
        if line.strip().startswith("- mnv"))
    assert cfg.optim.lr_batch and f"Global batch {cfg.optim.lr_batch}" in base


@pytest.mark.parametrize("model", sorted(TABLE_9))
def test_every_mnv4_distill_experiment_turns_distillation_on_and_targets_table_9(model):
    cfg = compose_train(f"experiment={model}_distill")
    assert cfg.distill is True and cfg.model.key == model and cfg.kd.method == "soft_target"
    assert _target(f"{model}_distill") == TABLE_9[model] and cfg.label_smoothing == 0.0
    assert cfg.optim.lr_batch == compose_train(f"experiment={model}_paper").optim.lr_batch


@pytest.mark.parametrize(("opt", "batch", "expected"), [("adamw", 1024, 0.002), ("sgd", 1024, 0.001),
                                                         ("adamw", 4096, 0.004)])
def test_lr_follows_the_global_batch_by_the_optimizers_rule(opt, batch, expected):


    factory = optimizer_factory(opt, lr=0.004, weight_decay=0.0, lr_batch=4096,
                                lr_scaling=compose_train(f"optim={opt}").optim.lr_scaling, global_batch=lambda: batch)
    optimizer = factory(nn.Linear(2, 2))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
