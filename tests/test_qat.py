"""Quantization-aware training (qat=true): the fake-quant network's train/eval behaviour, the int8 exports measured in
their runtimes, and the training run that makes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
pytest.importorskip("executorch", reason="qat needs the int8 extra: pip install 'mobilenet-train[int8]'")


def fake_quant(name: str = "mobilenetv3_small_100", img_size: int = 32, **kwargs):
    import timm

    from train.quant.backend import quantizer
    from train.quant.network import FakeQuantNetwork

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    return FakeQuantNetwork(model, img_size=img_size, quantizer=quantizer("xnnpack", weight_bits=8, qat=True))


def tensors(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}


def changed(before: dict, net, part: str) -> list[str]:
    now = net.state_dict()
    return [k for k in before if part in k and not torch.equal(before[k], now[k])]


def test_bn_freeze_stops_running_statistics_and_observers_stop_in_eval_and_when_frozen():
    net = fake_quant()
    x = torch.randn(8, 3, 32, 32)
    before = tensors(net)
    net(x)
    assert changed(before, net, "running_mean") and changed(before, net, "scale")  # training moves both

    net.eval()
    before = tensors(net)
    net(x)
    assert not changed(before, net, "")  # evaluating changes nothing: no statistics, no scales, no counters

    net.train()
    net.freeze_bn()
    before = tensors(net)
    net(x)
    assert not changed(before, net, "running_") and changed(before, net, "scale")

    net.freeze_observers()
    net.eval()
    net.train()  # a later train switch keeps both frozen
    before = tensors(net)
    net(x)
    assert not changed(before, net, "running_") and not changed(before, net, "scale")


def test_dropout_keeps_its_own_rate_through_train_and_eval_switches():
    net = fake_quant(drop_rate=0.2)
    for mode in (False, True, False, True):
        net.train(mode)
        assert [tuple(n.args[1:]) for n in net._nodes("dropout")] == [(0.2, mode)]


def test_a_checkpointed_fake_quant_network_loads_into_a_new_one_exactly():
    net = fake_quant()
    net(torch.randn(8, 3, 32, 32))
    net.freeze_bn()
    other = fake_quant()
    other.load_state_dict(net.state_dict())
    assert other.bn_frozen and not other.observers_frozen
    net.eval(), other.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(net(x), other(x))


def compose_run(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "model=mnv3_s_075", "data.img_size=64", "data.batch_size=25", "data.num_workers=1",
            "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.progress_bar=false",
            "logger.wandb.enabled=false", *overrides])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Synthetic shapes, enough of them (60 a class) for a small model to learn them well in a minute."""
    from data_pipes.shards.make import make_shards
    from data_pipes.shards.synthetic import make_image_folder

    tmp = tmp_path_factory.mktemp("shapes")
    images = make_image_folder(tmp / "images", train_per_class=60, val_per_class=5, size=64)
    make_shards(images, tmp / "shards", samples_per_shard=200, workers=1, progress=False)
    return tmp / "shards"


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, shapes) -> Path:
    """A float model trained by the pipeline until its predictions are confident (top-1 agreement between
    runtimes means little on the near-uniform logits of an untrained one)."""
    from train.run import train

    run_dir = tmp_path_factory.mktemp("float")
    train(compose_run(f"run_dir={run_dir}", f"data.root={shapes}", "trainer.max_epochs=12",
                      "optim.lr=4e-3", "optim.weight_decay=0.01", "sched.warmup_epochs=1", "label_smoothing=0.0",
                      "model.drop_rate=0.0", "aug.train.scale=[0.35,1.0]"))
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["top1"] >= 30  # well above chance (10 %)
    return run_dir / "export"


@pytest.mark.slow
def test_qat_run_fine_tunes_from_init_from_and_ships_int8_measured_in_each_runtime(tmp_path, shapes, float_export):
    from train.run import train

    run_dir = tmp_path / "qat"
    # This model is trained only so far (about 40 % top-1 on 10 shapes), so its logits have small margins and top-1
    # agreement between integer kernels and the PyTorch reference is lower than on a well trained model: the test's
    # thresholds are ExecuTorch 80 %, onnxruntime 70 % (the defaults, for trained models: 90 % and 75 %).
    metrics = train(compose_run("qat=true", f"init_from={float_export}", f"data.root={shapes}",
                                "trainer.max_epochs=2", "quant.freeze_bn_epoch=1", "quant.freeze_observer_epoch=1",
                                "quant.min_agreement.pte=80", "quant.min_agreement.onnx=70", f"run_dir={run_dir}"))
    export = run_dir / "export"
    for name in ("model.safetensors", "model.onnx", "model_int8.pte", "model_int8.onnx"):
        assert (export / name).is_file(), name
    shipped = json.loads((export / "metrics.json").read_text())
    for key in ("float_top1", "fakequant_top1", "int8_torch_top1", "int8_pte_top1", "int8_onnx_top1",
                "int8_pte_top5", "int8_pte_agreement", "int8_onnx_agreement", "int8_pte_max_abs_diff"):
        assert key in shipped, key
    # Each runtime agrees with the PyTorch int8 model above its threshold, and QAT kept the float model's top-1
    # within 3 of the 50 val images.
    assert shipped["int8_failures"] == [], shipped["int8_failures"]
    assert shipped["int8_pte_agreement"] >= 80.0 and shipped["int8_onnx_agreement"] >= 70.0
    float_top1 = json.loads((float_export / "metrics.json").read_text())["top1"]
    assert shipped["int8_pte_top1"] >= float_top1 - 6.0, (shipped["int8_pte_top1"], float_top1)
    assert shipped["size_mb"]["int8_pte"] < 0.5 * (export / "model.safetensors").stat().st_size / 1e6
    assert set(shipped["latency_ms"]) >= {"float_pte", "int8_pte", "float_onnx", "int8_onnx"}
    assert metrics["export/int8_pte_top1"] == shipped["int8_pte_top1"]
    # The checkpoint holds the fake-quant network, its frozen state included.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.graph.") and k.endswith(".scale") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["model._extra_state"] == {"bn_frozen": True, "observers_frozen": True}


@pytest.mark.slow
def test_train_export_ships_int8_from_a_qat_checkpoint_and_fails_loudly_below_the_agreement_threshold(
        tmp_path, shapes, float_export, capsys):
    from train.export import main
    from train.run import train

    run_dir = tmp_path / "qat"
    train(compose_run("qat=true", f"init_from={float_export}", f"data.root={shapes}", "trainer.max_epochs=1",
                      "export=false", f"run_dir={run_dir}"))
    # The same checkpoint with an agreement threshold no runtime can reach: the export is written, and says so.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["run_config"]["quant"]["min_agreement"]["pte"] = 101.0
    strict = tmp_path / "strict.ckpt"
    torch.save(ckpt, strict)
    assert main([str(strict), "--out", str(tmp_path / "out"), "--num-workers", "1", "--batch-size", "25"]) == 3
    err = capsys.readouterr().err
    assert "is below quant.min_agreement.pte=101.0%" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (tmp_path / "out" / "model_int8.pte").is_file() and len(metrics["int8_failures"]) == 1


@pytest.mark.slow
def test_post_training_quantization_of_a_float_checkpoint_exports_and_measures_int8(tmp_path, float_export):
    from train.export import main

    # The float model is trained only so far (about 40 % top-1): small logit margins, so the thresholds here are
    # ExecuTorch 70 %, onnxruntime 65 % top-1 agreement with the PyTorch int8 model (set in a copy's run config).
    ckpt = torch.load(float_export.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["run_config"]["quant"]["min_agreement"] = {"pte": 70.0, "onnx": 65.0}
    path = tmp_path / "float.ckpt"
    torch.save(ckpt, path)
    assert main([str(path), "--ptq", "--calib-batches", "4", "--out", str(tmp_path / "ptq"), "--num-workers", "1",
                 "--batch-size", "25", "--data-root", str(ckpt["dataset"]["root"])]) == 0
    metrics = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    assert metrics["int8_failures"] == [] and metrics["int8_pte_agreement"] >= 70.0
    assert abs(metrics["float_top1"] - json.loads((float_export / "metrics.json").read_text())["top1"]) < 1e-6
    with pytest.raises(SystemExit):
        main([str(path), "--calib-batches", "x"])
