"""Bad input stops `python -m train` with a message that names the problem and the fix, not a stack trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "train", f"hydra.run.dir={cwd}/run", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


def test_unknown_model_config_lists_the_valid_ones(tmp_path):
    out = assert_clean_failure(run_train("model=mnv9_xl", cwd=tmp_path), "mnv9_xl")
    assert "mnv4_hybrid_l" in out and "mnv1_025" in out


def test_unknown_timm_model_name_lists_valid_names_and_how_to_pick_one(tmp_path):
    assert_clean_failure(run_train("model=timm", "model.name=mobilenetv9_huge", cwd=tmp_path),
                         "mobilenetv9_huge", "model=timm model.name=", "mnv3_l_100")


def test_missing_data_root_says_what_is_expected_and_how_to_make_it(tmp_path):
    assert_clean_failure(run_train(cwd=tmp_path), "data.root", "data_pipes.shards.make")
    assert_clean_failure(run_train(f"data.root={tmp_path}/nowhere", cwd=tmp_path), "does not exist",
                         "data_pipes.shards.make")


def test_empty_data_root_says_how_to_make_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_train(f"data.root={tmp_path}/empty", cwd=tmp_path), "data_pipes.shards.make")


def test_misspelt_override_is_a_clear_hydra_error(tmp_path):
    assert_clean_failure(run_train("trainer.max_epoch=3", cwd=tmp_path), "max_epoch")


@pytest.mark.slow
def test_qat_without_a_float_model_or_with_another_architecture_says_what_init_from_is(tmp_path, synthetic_shards,
                                                                                       trained_teacher):
    out = assert_clean_failure(run_train("qat=true", f"data.root={synthetic_shards}", cwd=tmp_path),
                               "set init_from=<run>/export")
    assert "Could not override" not in out  # composed: a Hydra error would say this
    # trained_teacher is an export of mnv3_s_075: another model cannot start from it.
    assert_clean_failure(run_train("qat=true", "model=mnv3_s_100", f"data.root={synthetic_shards}",
                                   f"init_from={trained_teacher}", cwd=tmp_path),
                         "holds mobilenetv3_small_075, but this run's model is mobilenetv3_small_100")
    assert_clean_failure(run_train("qat=true", f"data.root={synthetic_shards}", f"init_from={tmp_path}/nothing",
                                   cwd=tmp_path), "does not exist")
    # The same model on data of other classes: QAT needs the float model's own classes.
    from data_pipes.shards.make import make_shards
    from data_pipes.shards.synthetic import make_image_folder

    images = make_image_folder(tmp_path / "four", num_classes=4, train_per_class=4, val_per_class=2, size=32)
    make_shards(images, tmp_path / "four-shards", samples_per_shard=64, workers=1, progress=False)
    assert_clean_failure(run_train("qat=true", "model=mnv3_s_075", f"data.root={tmp_path / 'four-shards'}",
                                   f"init_from={trained_teacher}",
                                   cwd=tmp_path), "was trained on 10 classes", "this data has 4")


@pytest.mark.slow
def test_a_float_run_never_imports_the_int8_runtimes(tmp_path, synthetic_shards):
    # A whole `python -m train` (train, validate, export with its onnxruntime check) without qat=true: torchao and
    # ExecuTorch (the int8 extra) are never imported, so a user without them loses nothing. (LiteRT's converter
    # imports torchao itself, a dependency of the litert extra: this run writes no .tflite.)
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('INT8 MODULES', sorted({m.split('.')[0] for m in sys.modules} "
            "& {'torchao', 'executorch'})))\n"
            f"sys.argv = ['train', 'hydra.run.dir={tmp_path}/run', 'experiment=demo', 'data.root={synthetic_shards}',"
            " 'trainer.max_epochs=1', 'data.num_workers=0', 'callbacks.progress_bar=false', 'export_tflite=false']\n"
            "runpy.run_module('train', run_name='__main__', alter_sys=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()
    assert "INT8 MODULES []" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_distill_without_a_teacher_or_with_a_missing_one_says_what_a_teacher_is(tmp_path, synthetic_shards):
    assert_clean_failure(run_train("distill=true", f"data.root={synthetic_shards}", cwd=tmp_path),
                         "kd.teacher=<export dir | checkpoint | timm name>")
    assert_clean_failure(run_train("distill=true", f"data.root={synthetic_shards}", f"kd.teacher={tmp_path}/no.ckpt",
                                   cwd=tmp_path), "no such export directory or checkpoint")
    assert_clean_failure(run_train("distill=true", f"data.root={synthetic_shards}", "kd.teacher=mobilenetv3_small_100",
                                   cwd=tmp_path), "kd.teacher_weights")


def test_image_size_the_model_cannot_take_is_refused(tmp_path, synthetic_shards):
    assert_clean_failure(run_train("data.img_size=8", f"data.root={synthetic_shards}", cwd=tmp_path), "img_size")
