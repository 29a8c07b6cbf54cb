"""`compile=true`: the network trains compiled (two graphs a start: training and eval, none after), resumes from an
eager checkpoint and from its own, ships the plain network, compiles an online teacher too, and is refused with
qat=true before anything starts. Compiling on 2 CPUs is slow (~40 s a graph the first time; inductor's on-disk cache
makes a graph it compiled before ~2 s), so the runs are a tiny model at 32 px for a few dozen steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_run
from lightning import Callback
from preemption import PreemptAt, Preemption

from data_pipes.errors import Problems
from train.callbacks.compile_watch import CompileWatch
from train.features.compile import Compilation
from train.nets.compiled import compiled_graphs, compiler_problem, is_compiled, plain_network
from train.run import train

STEPS_PER_EPOCH = 12  # 200 train images of the synthetic shards, batch 16


def run(root: Path, run_dir: Path, *overrides: str, callbacks=()) -> dict[str, float]:
    return train(compose_run(
        f"run_dir={run_dir}", f"data.root={root}", "data.batch_size=16", "trainer.max_epochs=2",
        "ema.decay=0.9", "aug.mixup.mixup_alpha=0.8", "callbacks.checkpoint.every_n_train_steps=1",
        "export_latency=false", *overrides), callbacks=callbacks)


class Graphs(Callback):
    """Graphs dynamo compiled during this start's fit, those the run's CompileWatch counted after its first steps,
    and whether the network (and the teacher) ran compiled."""

    def __init__(self) -> None:
        self.before, self.compiled, self.teacher_compiled, self.recompiles = 0, None, None, None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.before = compiled_graphs()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.compiled = is_compiled(pl_module.model)
        teacher = getattr(pl_module.objective, "teacher", None)
        self.teacher_compiled = None if teacher is None else is_compiled(teacher.model)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.recompiles = next(c for c in trainer.callbacks if isinstance(c, CompileWatch)).recompiles()

    @property
    def added(self) -> int:
        return compiled_graphs() - self.before


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_compiled_run_resumes_from_an_eager_checkpoint_and_its_own_compiles_two_graphs_a_start_and_exports_plain(
        tmp_path, synthetic_shards):
    run_dir = tmp_path / "run"
    # An eager start, killed mid-epoch 1 (its checkpoint of step 4 on disk) ...
    with pytest.raises(Preemption):
        run(synthetic_shards, run_dir, callbacks=[PreemptAt(5)])
    eager_keys = list(last_checkpoint(run_dir)["state_dict"])
    # ... resumed compiled, through the epoch's validation, killed mid-epoch 2 ...
    first = Graphs()
    with pytest.raises(Preemption):
        run(synthetic_shards, run_dir, "compile=true", "ckpt_path=last", callbacks=[first, PreemptAt(16)])
    assert first.compiled is True
    # The first compiled start of this module's model in this process: the training graph and the eval graph; the
    # EMA's weight swap and Mixup add none.
    assert first.added == 2
    compiled_ckpt = last_checkpoint(run_dir)
    assert compiled_ckpt["global_step"] == 15
    assert list(compiled_ckpt["state_dict"]) == eager_keys  # the same file as an eager run's (no `_orig_mod.`)
    # ... and resumed compiled from its own checkpoint to the end, then exported.
    second = Graphs()
    metrics = run(synthetic_shards, run_dir, "compile=true", "ckpt_path=last", callbacks=[second])
    # In this process dynamo reuses the first start's graphs for the new network (parameters are graph inputs); a
    # real restart, a new process, compiles the same two (from inductor's cache). Either way none after that.
    assert second.added in (0, 2) and second.recompiles == 0
    assert last_checkpoint(run_dir)["global_step"] == 2 * STEPS_PER_EPOCH
    # The export is the plain network: it reloads through timm, its ONNX matches it, and its top-1 (an eager fp32
    # evaluation of the final weights) is the compiled run's last validation within float noise (one image of 50).
    exported = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert exported["onnx_max_abs_diff"] < 1e-4
    assert abs(exported["top1"] - metrics["val/acc1"]) <= 2.0, (exported["top1"], metrics["val/acc1"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"


@pytest.mark.slow
def test_an_online_teacher_runs_compiled_beside_the_student_in_bf16_without_recompiling(
        tmp_path, synthetic_shards, trained_teacher):
    graphs = Graphs()
    metrics = run(synthetic_shards, tmp_path / "run", "compile=true", "distill=true", "kd=logit",
                  f"kd.teacher={trained_teacher}", "trainer.precision=bf16-mixed", "trainer.max_epochs=1",
                  "export=false", "ema.decay=null", callbacks=[graphs])
    assert graphs.compiled is True and graphs.teacher_compiled is True
    # student: training and eval graphs; teacher: one eval graph per input size it sees (training's and
    # validation's views are the same size here), all in the first step and the first validation batch.
    assert graphs.added == 3, graphs.added
    assert graphs.recompiles == 0
    assert 0 <= metrics["val/teacher_agree"] <= 100


def test_compile_with_qat_and_an_unknown_mode_are_refused_before_the_run_starts(tmp_path, synthetic_shards):
    with pytest.raises(Problems) as caught:
        train(compose_run(f"run_dir={tmp_path / 'run'}", f"data.root={synthetic_shards}", "compile=true", "qat=true",
                          "compile_mode=fastest"))
    found = "\n".join(caught.value.found)
    assert "compile=true with qat=true" in found and "drop compile=true" in found, found
    assert "compile_mode='fastest': must be one of torch.compile's modes: default, reduce-overhead" in found, found
    assert not (tmp_path / "run").exists()


def test_without_a_cpu_compiler_compile_is_refused_with_the_package_to_install(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "apt install g++" in compiler_problem(on_gpu=False)
    monkeypatch.undo()
    assert compiler_problem(on_gpu=False) is None  # this machine has one


def test_the_network_compiles_in_place_and_ships_plain():
    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    keys = list(model.state_dict())
    compiled = Compilation(mode="default", qat=False).wrap_network(model, img_size=32, info=None)
    assert compiled is model and is_compiled(model)
    assert list(model.state_dict()) == keys  # nothing compiles until the first call; the keys are the eager ones
    shipped = Compilation(mode="default", qat=False).shipped_network(model, num_classes=5)
    assert shipped is model and not is_compiled(shipped)
    assert plain_network(shipped) is shipped
