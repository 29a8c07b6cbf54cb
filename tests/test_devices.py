"""Where tensors live on a multi-GPU node, checked by mechanism on the CPU: what is reduced sits on the module's
device, checkpoints load onto the CPU (not every rank onto GPU 0), and a rank saves and restores only its own
device's CUDA generator. The GPU check (`python -m bench.gpu_check`) runs the same paths on a real GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from train.callbacks import rng
from train.callbacks.checkpoints import AtomicCheckpointIO
from train.module import ImageClassifier
from train.objective import ClassificationObjective, NoMixing
from train.optim import optimizer_factory, scheduler_factory


class DeviceCheckingStrategy:
    """A strategy whose reduce fails, as NCCL does, when the tensor is not on the module's device."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert tensor.device == self.module.device, f"reduce on {tensor.device}, module on {self.module.device}"
        return torch.tensor([3, 5, 10])  # what the other ranks' sum would come back as


def classifier() -> ImageClassifier:
    return ImageClassifier(nn.Linear(2, 2), num_classes=2, mean=[0.5] * 3, std=[0.25] * 3,
                           objective=ClassificationObjective(0.0), batch_mixing=NoMixing(),
                           optimizer=optimizer_factory("sgd", lr=0.1, weight_decay=0.0),
                           scheduler=scheduler_factory("cosine", 1), updates_per_epoch=lambda: 1, channels_last=False)


def test_train_counts_restored_from_a_checkpoint_are_reduced_on_the_modules_device(monkeypatch):
    module = classifier()
    trainer = SimpleNamespace(is_global_zero=True, strategy=DeviceCheckingStrategy(module))
    monkeypatch.setattr(ImageClassifier, "trainer", property(lambda self: trainer))
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(values))
    # Lightning restores the module's checkpoint state before it moves the module to its device; a checkpoint
    # written after an epoch's last validation then resumes straight into the epoch's end (no training step).
    module.on_load_checkpoint({"train_counts": torch.tensor([1, 2, 4])})
    module.to("meta")  # stands in for cuda:<rank>: any device other than the CPU the counts were restored on
    module.on_train_epoch_end()
    assert logged == {"train/acc1_epoch": 30.0, "train/acc5_epoch": 50.0}
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["train_counts"].device.type == "cpu"


def test_checkpoints_load_onto_the_cpu_unless_asked_otherwise(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    seen = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    io = AtomicCheckpointIO()
    io.load_checkpoint(path)  # how Lightning's strategy calls it: no map_location
    io.load_checkpoint(path, map_location="meta")
    assert seen == ["cpu", "meta"]


class FakeCuda:
    """torch.cuda of a process that drives device 3 of 8 visible ones."""

    def __init__(self, visible: int = 8, device: int = 3) -> None:
        self.visible, self.device = visible, device
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(visible)}
        self.set_calls: list[int] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return self.device

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self.device].clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.states[i].clone() for i in range(self.visible)]

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.set_calls.append(int(state[0]))

    def set_rng_state_all(self, states) -> None:
        raise RuntimeError("set_rng_state_all: a resume that sees fewer devices per process fails here")


@pytest.mark.parametrize("visible_at_resume", [8, 1], ids=["same_node_shape", "one_device_per_process"])
def test_a_rank_saves_and_restores_only_its_own_devices_cuda_generator(monkeypatch, visible_at_resume):
    cuda = FakeCuda()
    monkeypatch.setattr(torch, "cuda", cuda)
    states = rng._rng_states()
    assert [int(s[0]) for s in states["cuda"]] == [3] and states["cuda_device"] == 3
    resumed = FakeCuda(visible=visible_at_resume, device=0 if visible_at_resume == 1 else 3)
    monkeypatch.setattr(torch, "cuda", resumed)
    rng._set_rng_states(states)
    assert resumed.set_calls == [3]  # the saved device's state, put on the device this rank drives now


def test_checkpoints_that_saved_every_devices_cuda_state_restore_the_current_devices_entry(monkeypatch):
    cuda = FakeCuda(device=2)
    monkeypatch.setattr(torch, "cuda", cuda)
    states = {**rng._rng_states(), "cuda": cuda.get_rng_state_all()}
    del states["cuda_device"]  # the format before: every visible device's state
    rng._set_rng_states(states)
    assert cuda.set_calls == [2]
