"""The one loader of trained networks (train.nets.load): an export directory, a checkpoint of ours and a timm name
with local weights give the same network, classes and preprocessing; what is not a network of ours is refused by
name of the setting that gave it."""

from __future__ import annotations

import pytest
import torch

from train.nets.files import WEIGHTS_FILE
from train.nets.load import LoadError, Settings, load_network

TEACHER = Settings("kd.teacher", weights="kd.teacher_weights", labels="kd.teacher_labels")


def test_an_export_its_checkpoint_and_its_timm_name_with_the_weights_file_load_the_same_network(trained_teacher,
                                                                                                    tmp_path):
    export = load_network(trained_teacher, settings=TEACHER)
    # The run wrote last.ckpt after its final validation, from the weights it exported (no EMA in this run).
    checkpoint = load_network(trained_teacher.parent / "checkpoints" / "last.ckpt", settings=TEACHER)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(export.label_names) + "\n")
    by_name = load_network(export.architecture, settings=TEACHER, weights=str(trained_teacher / WEIGHTS_FILE),
                           labels=str(labels))
    assert (export.kind, checkpoint.kind, by_name.kind) == ("export", "checkpoint", "timm")
    assert export.architecture == checkpoint.architecture == by_name.architecture == "mobilenetv3_small_075"
    assert export.label_names == checkpoint.label_names == by_name.label_names and len(export.label_names) == 10
    assert export.data_config == checkpoint.data_config and export.data_config["input_size"] == [3, 32, 32]
    assert export.weights_sha256 == by_name.weights_sha256 != checkpoint.weights_sha256  # a file's hash each
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = export.model(x)
        for other in (checkpoint, by_name):
            assert not other.model.training
            torch.testing.assert_close(other.model(x), ref)


def test_what_is_not_a_network_of_ours_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(LoadError, match=r"^kd.teacher=.*nowhere.ckpt: no such export directory or checkpoint"):
        load_network(tmp_path / "nowhere.ckpt", settings=TEACHER)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=r"^kd.teacher=.*empty: it is not an export directory"):
        load_network(tmp_path / "empty", settings=TEACHER)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(LoadError, match=r"notes.ckpt is not a PyTorch checkpoint"):
        load_network(tmp_path / "notes.ckpt", settings=TEACHER)
    with pytest.raises(LoadError, match="set kd.teacher_weights to a local weights file"):
        load_network("mobilenetv3_small_100", settings=TEACHER)
    with pytest.raises(LoadError, match="^init_from=mobilenetv3_small_100: no such export directory or checkpoint"):
        load_network("mobilenetv3_small_100", settings=Settings("init_from"))
