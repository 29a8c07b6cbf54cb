"""Optional features as components: the config's switches choose them, and each contributes only its own parts."""

from __future__ import annotations

import pytest
from conftest import compose_run

from train.features import Feature, Features, KnowledgeDistillation, QuantizationAware, build_features
from train.quant.backend import QuantError


def test_the_distill_and_qat_switches_choose_the_components_and_nothing_else_does():
    def kinds(*overrides: str) -> list[type]:
        return [type(f) for f in build_features(compose_run("run_dir=unused", *overrides)).features]

    assert kinds() == []
    assert kinds("distill=true") == [KnowledgeDistillation]
    assert kinds("qat=true", "init_from=x") == [QuantizationAware]
    assert kinds("distill=true", "qat=true", "init_from=x") == [KnowledgeDistillation, QuantizationAware]
    # qat=true distill=true: the float model QAT starts from is the default teacher
    both = build_features(compose_run("run_dir=unused", "distill=true", "qat=true", "init_from=/runs/a/export"))
    assert both.features[0].kd["teacher"] == "/runs/a/export"


def test_each_feature_changes_only_its_parts_and_features_apply_in_turn():
    qat = QuantizationAware.from_config(compose_run("run_dir=unused", "qat=true", "quant.lr_scale=0.1"))
    kd = KnowledgeDistillation.from_config(compose_run("run_dir=unused", "distill=true", "kd.drop_rate=0.3"))
    both = Features([kd, qat])
    optim, sched = both.optimizer({"lr": 1.0}, {"warmup_lr": 0.5, "min_lr": 0.0})
    assert optim == {"lr": 0.1} and sched == {"warmup_lr": 0.05, "min_lr": 0.0}  # qat's lr scale, a 0 floor kept
    assert both.regularisation({"drop_rate": 0.2, "drop_path_rate": 0.1}) == {"drop_rate": 0.3, "drop_path_rate": 0.0}
    assert both.trainer({"precision": "auto", "max_epochs": 3}) == {"precision": "32-true", "max_epochs": 3}
    with pytest.raises(QuantError, match="qat=true trains in fp32"):
        both.trainer({"precision": "bf16-mixed"})
    assert [type(c).__name__ for c in both.callbacks()] == ["QATSchedule"]
    plain = Features([Feature()])  # every hook's default adds nothing
    assert plain.optimizer({"lr": 1.0}, {}) == ({"lr": 1.0}, {}) and plain.callbacks() == [] and plain.record() == {}
