"""LiteRT exports: model.tflite checked and evaluated in LiteRT's interpreter, model_int8.tflite from the same prepared
graph as the other int8 files, the op that stops a conversion named, the extra optional and said once when missing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from train.export import ONNX_REL_TOL, export_model
from train.nets import litert
from train.nets.files import ARTIFACTS, INT8_TFLITE_FILE, TFLITE_FILE
from train.nets.normalize import normalize

ARCH = "mobilenetv3_small_050"
NUM_CLASSES = 8
SIZE = 64
LABELS = [f"class_{i}" for i in range(NUM_CLASSES)]
DATA_CONFIG = {"input_size": [3, SIZE, SIZE], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.9,
               "interpolation": "bilinear", "crop_mode": "center"}
needs_litert = pytest.mark.skipif(not litert.available(), reason="the litert extra is not installed: pip install -e "
                                                                  "'.[litert]' (make test installs it)")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A random network with the spread logits of a trained one (BN statistics of its own inputs, a scaled head)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES)
    images = normalize(_images(64, seed=5), DATA_CONFIG["mean"], DATA_CONFIG["std"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()(images)
        model.classifier.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def val_batches(trained) -> list[dict]:
    images = _images(24)
    with torch.no_grad():
        target = trained(normalize(images, DATA_CONFIG["mean"], DATA_CONFIG["std"])).argmax(1)
    target[::3] = (target[::3] + 1) % NUM_CLASSES  # a third wrong: top-1 is 66.67 %, not trivially 100
    valid = torch.arange(24) < 22  # two padding images, counted by no runtime
    return [{"image": images[i:i + 8], "target": target[i:i + 8], "valid": valid[i:i + 8]} for i in (0, 8, 16)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained, val_batches):
    if not litert.available():
        pytest.skip("the litert extra is not installed: pip install -e '.[litert]' (make test installs it)")
    out = tmp_path_factory.mktemp("run") / "export"
    return export_model(trained, out, architecture=ARCH, label_names=LABELS, data_config=DATA_CONFIG,
                        val_batches=iter(val_batches), latency=True, tflite=True)


@needs_litert
def test_float_export_writes_model_tflite_and_measures_it_in_litert_beside_pytorch(exported):
    m = exported.metrics
    assert sorted(p.name for p in exported.out_dir.iterdir()) == sorted([*ARTIFACTS, TFLITE_FILE])
    assert m["val_images"] == 22 and m["top1"] == pytest.approx(100 * 14 / 22)
    # The same images through LiteRT's interpreter: same top-1, same ranking, logits within float noise.
    assert (m["tflite_top1"], m["tflite_top5"], m["tflite_agreement"]) == (m["top1"], m["top5"], 100.0)
    assert m["tflite_max_abs_diff"] <= ONNX_REL_TOL * exported.logit_scale
    assert m["tflite_input"] == f"NHWC float32 [1, {SIZE}, {SIZE}, 3], normalised"
    assert m["size_mb"]["tflite"] > 0.5
    assert {"tflite_1thread", "tflite_all_threads", "onnx_1thread"} <= set(m["latency_ms"])
    assert all(v > 0 for v in m["latency_ms"].values())
    assert m["tflite_outside_xnnpack"] == {} and m["tflite_xnnpack_partitions"] == 1  # XNNPACK takes all of MNv3
    assert json.loads((exported.out_dir / "metrics.json").read_text())["tflite_top1"] == m["tflite_top1"]


@needs_litert
def test_the_tflite_file_is_what_a_phone_app_feeds_nhwc_pixels_normalised(exported, trained):
    """Read with LiteRT's interpreter directly (not our runner): an NHWC image in, the PyTorch logits out."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported.out_dir / TFLITE_FILE))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(inp["shape"]) == [1, SIZE, SIZE, 3] and list(out["shape"]) == [1, NUM_CLASSES]
    x = normalize(_images(1, seed=9), DATA_CONFIG["mean"], DATA_CONFIG["std"])
    interpreter.set_tensor(inp["index"], x.permute(0, 2, 3, 1).contiguous().numpy())
    interpreter.invoke()
    with torch.inference_mode():
        ref = trained(x).numpy()
    got = interpreter.get_tensor(out["index"])
    assert np.abs(got - ref).max() <= ONNX_REL_TOL * np.abs(ref).max()


class AttentionNet(torch.nn.Module):
    """MNv4-Hybrid's attention block (timm's MobileAttention with multi-query attention, keys and values
    downsampled) between a stem and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models._efficientnet_blocks import MobileAttention

        self.stem = torch.nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.block = MobileAttention(32, 32, num_heads=4, key_dim=16, value_dim=16, kv_stride=2, dw_kernel_size=3,
                                     layer_scale_init_value=None, use_multi_query=True)
        self.head = torch.nn.Linear(32, 10)
        with torch.no_grad():  # peakier attention, as trained: the wrong lowering is off by 1 % of the logits here
            self.block.attn.query.proj.weight.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@needs_litert
@pytest.mark.parametrize("fused", [True, False], ids=["fused_attention", "explicit_attention"])
def test_attention_converts_to_litert_matching_pytorch_whichever_way_timm_computes_it(tmp_path, fused):
    # litert-torch lowers F.scaled_dot_product_attention (timm's fused_attn) wrongly: MNv4-Hybrid-M's float .tflite
    # was off by 25-45 % of its logit scale. write_tflite converts the explicit matmul-softmax-matmul instead.
    torch.manual_seed(0)
    net = AttentionNet().eval()
    net.block.attn.fused_attn = fused
    litert.write_tflite(net, tmp_path / "attn.tflite", SIZE, what="the attention network")
    assert net.block.attn.fused_attn == fused  # the caller's model is left as it was
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = net(x)
    got = litert.TfliteRunner(tmp_path / "attn.tflite")(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()


@needs_litert
def test_a_network_litert_cannot_convert_names_the_op_and_leaves_the_other_files_intact(tmp_path, monkeypatch,
                                                                                         trained, val_batches):
    out = tmp_path / "export"
    out.mkdir()
    (out / TFLITE_FILE).write_text("an earlier export's file, which this export could not renew")
    # torch.bucketize: onnxruntime runs it, LiteRT has no lowering for it.
    monkeypatch.setattr(torch.nn.Hardswish, "forward",
                        lambda self, x: F.hardswish(x) + 0 * torch.bucketize(x, torch.tensor([0.0, 1.0])).float())
    report = export_model(trained, out, architecture=ARCH, label_names=LABELS, data_config=DATA_CONFIG,
                          val_batches=val_batches, latency=False, tflite=True)
    error = report.metrics["tflite_error"]
    assert "the op aten.bucketize.Tensor stopped it" in error and "export_tflite=false" in error, error
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS), "stale model.tflite kept, or a file missing"
    assert report.metrics["top1"] == pytest.approx(100 * 14 / 22) and "tflite_top1" not in report.metrics
    assert json.loads((out / "metrics.json").read_text())["tflite_error"] == error


def test_a_missing_litert_extra_is_said_once_and_the_export_goes_on(tmp_path, monkeypatch, caplog, trained,
                                                                      val_batches):
    monkeypatch.setattr(litert, "available", lambda: False)
    monkeypatch.setattr(litert, "_said_missing", False)
    with caplog.at_level(logging.INFO):
        for i in range(2):
            report = export_model(trained, tmp_path / f"export{i}", architecture=ARCH, label_names=LABELS,
                                  data_config=DATA_CONFIG, val_batches=val_batches, latency=False, tflite=True)
            assert sorted(p.name for p in report.out_dir.iterdir()) == sorted(ARTIFACTS)
            assert not any(k.startswith("tflite") for k in report.metrics)
    said = [r.getMessage() for r in caplog.records if "litert extra is not installed" in r.getMessage()]
    assert len(said) == 1 and "pip install 'mobilenet-train[litert]'" in said[0], said


def test_a_litert_module_that_cannot_be_imported_says_how_to_install_it():
    with pytest.raises(litert.LiteRTError, match=r"pip install 'mobilenet-train\[litert\]'"):
        litert.require("litert_torch_that_is_not_installed")


def test_runs_and_exports_without_litert_never_import_it():
    code = ("import sys; import train.run, train.export, train.quant.deploy, train.nets.litert, train.compare; "
            "bad = [m for m in ('litert_torch', 'ai_edge_litert') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_converter_error_is_reduced_to_the_op_and_the_line_that_calls_it():
    error = RuntimeError('Lowering not found: aten.erfinv.default\n\nWhile executing %erfinv\nOriginal traceback:\n'
                         'File "/x/wrap.py", line 3, in forward\n    return self.wrapped(x)\n'
                         'File "/x/net.py", line 9, in forward\n    x = torch.special.erfinv(x)\n')
    assert litert.blocking_op(error).startswith(
        "the op aten.erfinv.default stopped it (called as `x = torch.special.erfinv(x)`)")
    assert litert.blocking_op(ValueError("no op here")) == "ValueError: no op here"


# ------------------------------------------------------------------------------------------------ int8


@needs_litert
def test_int8_tflite_comes_from_the_same_calibrated_graph_as_the_pytorch_int8_model_and_follows_it(tmp_path, trained,
                                                                                                  val_batches):
    """The LiteRT half of `deploy` (its ExecuTorch and ONNX halves, and all three from one QAT graph in a run, are
    tested in test_qat_network / test_qat_run)."""
    from train.quant.deploy import convert, measure, output_step, write_tflite_int8
    from train.quant.recipe import PTQNetwork

    net = PTQNetwork(trained, img_size=SIZE, quant={"backend": "xnnpack", "weight_bits": 8,
                                                    "ptq_observer": "moving_average"})
    net.calibrate(val_batches, mean=DATA_CONFIG["mean"], std=DATA_CONFIG["std"], limit=3)
    lite = write_tflite_int8(net.graph, tmp_path / INT8_TFLITE_FILE, SIZE)
    assert lite.failure is None and lite.runner is not None
    converted = convert(net.graph)  # what ExecuTorch and ONNX are made from
    results = measure({"int8_torch": converted, "tflite": lite.runner}, "int8_torch", val_batches,
                      mean=DATA_CONFIG["mean"], std=DATA_CONFIG["std"], num_classes=NUM_CLASSES)
    # Measured: 86-95 % on these 22 images of a random network, whose logits are close (ExecuTorch's XNNPACK kernels
    # agreed as often); on trained models and real photos, bench.deploy.
    assert results["tflite"]["agree"] >= 75.0, results
    # The same calibration: the file's input scale is the one the PyTorch int8 graph quantizes its input with.
    first_quantize = next(n for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target))
    assert lite.runner.input["quantization"][0] == pytest.approx(float(first_quantize.args[1]), rel=1e-6)
    # and its logits move in the PyTorch int8 model's output step (what int8_decided counts ties in)
    assert lite.runner.output["quantization"][0] == pytest.approx(output_step(converted), rel=1e-6)
    m = lite.metrics
    assert m["int8_tflite_input"].startswith(f"NHWC int8 [1, {SIZE}, {SIZE}, 3], normalised, quantized with scale")
    assert 0 < (tmp_path / INT8_TFLITE_FILE).stat().st_size < 0.5 * 2.4e6  # int8: well under the float file's 2.4 MB
    latency = litert.tflite_latencies(tmp_path / INT8_TFLITE_FILE, SIZE, prefix="int8_")  # what latency=true adds
    assert set(latency) == {"int8_tflite_1thread", "int8_tflite_all_threads"} and min(latency.values()) > 0
    # What LiteRT computes in float or keeps from XNNPACK is reported, by op (MNv3's squeeze-excite mean stays
    # float: the quantizer does not annotate it).
    assert m["int8_tflite_float_ops"].get("MEAN", 0) > 0, m["int8_tflite_float_ops"]
    assert (m["int8_tflite_xnnpack_partitions"] > 1) == bool(m["int8_tflite_outside_xnnpack"])


@needs_litert
def test_int8_attention_converts_to_litert_following_the_pytorch_int8_model(tmp_path):
    # The int8 file is converted from the quantized graph, where timm's fused attention is one
    # scaled_dot_product_attention op (float between dequantize and quantize): litert-torch's wrong lowering of it
    # put this network's LiteRT logits 8 output steps from PyTorch's (1.4 on average); written out, within 2 (0.14).
    from train.quant.deploy import convert, output_step, write_tflite_int8
    from train.quant.recipe import PTQNetwork

    torch.manual_seed(0)
    net = PTQNetwork(AttentionNet().eval(), img_size=SIZE, quant={"backend": "xnnpack", "weight_bits": 8,
                                                                  "ptq_observer": "moving_average"})
    with torch.inference_mode():
        for _ in range(4):
            net.graph(torch.randn(8, 3, SIZE, SIZE))
    converted = convert(net.graph)
    assert any("scaled_dot_product_attention" in str(n.target) for n in converted.graph.nodes)  # fused, as trained
    lite = write_tflite_int8(net.graph, tmp_path / INT8_TFLITE_FILE, SIZE)
    assert lite.failure is None, lite.failure
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = converted(x)
    steps = (lite.runner(x) - expected).abs() / output_step(converted)
    assert steps.max() <= 3 and steps.mean() <= 0.5, (steps.max(), steps.mean())
    assert lite.metrics["int8_tflite_float_ops"].get("SOFTMAX", 0) == 1  # attention stays float, as in PyTorch


def test_attention_written_out_computes_what_the_fused_op_computes():
    torch.manual_seed(0)
    net = AttentionNet().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    graph = torch.export.export(net, (x,)).module()
    explicit = litert.explicit_attention(graph)
    names = [str(n.target) for n in explicit.graph.nodes]
    assert not any("scaled_dot_product_attention" in n for n in names) and any("softmax" in n for n in names)
    assert any("scaled_dot_product_attention" in str(n.target) for n in graph.graph.nodes)  # the caller's graph kept
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), net(x), rtol=1e-5, atol=1e-5)


def test_attention_litert_cannot_write_out_is_refused_naming_what_it_has():
    class Causal(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    graph = torch.export.export(Causal(), (torch.randn(1, 2, 4, 8),)).module()
    with pytest.raises(litert.LiteRTError, match=r"attention op .*is_causal.*--no-tflite"):
        litert.explicit_attention(graph)


def test_an_int8_graph_litert_cannot_convert_is_that_runtimes_failure_naming_the_op(tmp_path, monkeypatch):
    from train.quant import deploy

    def refuse(*args, **kwargs):
        raise litert.LiteRTError("LiteRT cannot convert the int8 model: the op aten.bucketize.Tensor stopped it")

    monkeypatch.setattr(deploy, "convert", lambda graph, **kw: graph)
    monkeypatch.setattr(litert, "write_tflite", refuse)
    (tmp_path / INT8_TFLITE_FILE).write_text("partial")
    lite = deploy.write_tflite_int8(torch.nn.Identity(), tmp_path / INT8_TFLITE_FILE, SIZE)
    assert lite.runner is None and not (tmp_path / INT8_TFLITE_FILE).exists()
    assert lite.failure == "tflite: LiteRT cannot convert the int8 model: the op aten.bucketize.Tensor stopped it"
    assert lite.metrics == {"int8_tflite_error": lite.failure.removeprefix("tflite: ")}


def test_delegation_finds_the_ops_that_run_outside_xnnpack_by_walking_back_from_the_outputs(monkeypatch):
    """A node list as the interpreter reports it after XNNPACK: nodes 0-3, then one DELEGATE node that replaced
    0, 1 and 3; node 2 (a float op XNNPACK did not take) still runs between the input and the delegate."""
    nodes = [
        {"index": 0, "op_name": "CONV_2D", "inputs": [10, 20], "outputs": [11], "operand_types": [np.int8]},
        {"index": 1, "op_name": "DEQUANTIZE", "inputs": [11], "outputs": [12], "operand_types": [np.int8]},
        {"index": 2, "op_name": "HARD_SWISH", "inputs": [0], "outputs": [10], "operand_types": [np.float32]},
        {"index": 3, "op_name": "MEAN", "inputs": [12], "outputs": [13], "operand_types": [np.float32]},
        {"index": 4, "op_name": "DELEGATE", "inputs": [10, 20], "outputs": [13], "operand_types": [np.float32]},
    ]

    class FakeInterpreter:
        def _get_ops_details(self):
            return nodes

        def get_output_details(self):
            return [{"index": 13}]

    class FakeRunner:
        def __init__(self, path, threads):
            self.interpreter = FakeInterpreter()

    monkeypatch.setattr(litert, "TfliteRunner", FakeRunner)
    placed = litert.delegation("any.tflite")
    assert placed.outside_xnnpack == {"HARD_SWISH": 1} and placed.partitions == 1
    assert placed.float_ops == {"HARD_SWISH": 1, "MEAN": 1}


def test_train_export_exits_3_when_litert_failed_and_says_why(tmp_path, monkeypatch, capsys):
    from train.export import ExportReport, cli

    metrics = {"architecture": ARCH, "top1": 50.0, "top5": 90.0, "val_images": 22, "onnx_max_abs_diff": 1e-7,
               "tflite_error": "LiteRT cannot convert x (float): the op aten.bucketize.Tensor stopped it"}
    report = ExportReport(out_dir=tmp_path, files={}, metrics=metrics, reload_max_abs_diff=0.0, logit_scale=1.0,
                          onnx_bound=1e-3)
    monkeypatch.setattr(cli, "is_qat_checkpoint", lambda ckpt: False)
    monkeypatch.setattr(cli, "read_checkpoint", lambda path: {})
    monkeypatch.setattr(cli, "export_checkpoint", lambda *a, **kw: report)
    assert cli.main([str(tmp_path / "last.ckpt"), "--out", str(tmp_path)]) == 3
    captured = capsys.readouterr()
    assert "exported mobilenetv3_small_050" in captured.out
    assert "error: LiteRT cannot convert x (float): the op aten.bucketize.Tensor stopped it" in captured.err
