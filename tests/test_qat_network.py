"""The fake-quant network (qat=true): its train/eval behaviour, BN and observer freezing, reloading, and, per MobileNet
family, fine-tuning with fake quantization, converting to int8 and running it in ExecuTorch and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def test_the_graph_follows_lightnings_restore_of_the_training_flag_after_validation():
    from lightning.pytorch.utilities.model_helpers import _ModuleMode

    net = fake_quant(drop_rate=0.2)
    x = torch.randn(8, 3, 32, 32)
    mode = _ModuleMode()  # what Lightning's evaluation loop does around every validation
    mode.capture(net)
    net.eval()
    mode.restore(net)  # sets each module's `training` attribute; never calls train()
    assert net.training
    before = tensors(net)
    torch.manual_seed(0)
    first = net(x)
    assert changed(before, net, "running_mean") and changed(before, net, "scale")  # BN and observers train again
    assert [n.args[2] for n in net._nodes("dropout")] == [True]
    torch.manual_seed(1)
    assert not torch.equal(first, net(x))  # dropout draws again


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
    other.train()
    before = tensors(other)
    other(torch.randn(8, 3, 32, 32))  # training again: the loaded BN freeze holds in the graph too
    assert not changed(before, other, "running_") and changed(before, other, "scale")


def test_a_qat_checkpoint_with_dropout_restores_for_export_with_the_rates_its_run_recorded():
    from train.nets.load import network_args
    from train.quant.backend import QuantError
    from train.quant.recipe import restore_network

    # Dropout above zero is an op of the exported graph, with an observer of its own: the checkpoint of such a run
    # fits only a network rebuilt with its rates (python -m train.export of MNv4 and MNv2 configs).
    net = fake_quant("mobilenetv4_conv_small", drop_rate=0.2, drop_path_rate=0.1)
    net(torch.randn(8, 3, 32, 32))
    net.eval()
    quant = {"backend": "xnnpack", "weight_bits": 8}
    recorded = {"network_args": {"drop_rate": 0.2, "drop_path_rate": 0.1},
                "run_config": {"model": {"drop_rate": 0.0, "drop_path_rate": 0.0}}}  # a feature set its own rates
    restored = restore_network("mobilenetv4_conv_small", 10, 32, quant, net.state_dict(), network_args(recorded))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(net(x), restored(x))
    older = {"run_config": {"model": {"drop_rate": 0.2, "drop_path_rate": 0.1}}}  # predates the record: the model's
    assert network_args(older) == recorded["network_args"]
    with pytest.raises(QuantError, match="does not fit a fresh mobilenetv4_conv_small fake-quant network"):
        restore_network("mobilenetv4_conv_small", 10, 32, quant, net.state_dict(), {})  # timm's default: no dropout


def test_stochastic_depth_is_left_out_of_the_fake_quant_network_so_it_evaluates_and_ships_deterministically():
    # timm draws the drop-path mask only while training, a branch torch.export froze: the QAT graph of MNv4-Hybrid-M
    # (drop path 0.075) kept drawing it in eval, scaled every residual branch by 1/keep, and ExecuTorch refused its
    # aten.bernoulli when the export lowered it.
    import timm

    with_sd, without = fake_quant(drop_path_rate=0.2), fake_quant()
    assert not [n for n in with_sd.graph.graph.nodes if "bernoulli" in str(n.target)]
    assert set(with_sd.state_dict()) == set(without.state_dict())  # the same observers: the graph of rate 0
    without.load_state_dict(with_sd.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with_sd.eval(), without.eval()
    assert torch.equal(with_sd(x), without(x)) and torch.equal(with_sd(x), with_sd(x))
    model = timm.create_model("mobilenetv3_small_100", num_classes=10, drop_path_rate=0.2)
    from train.quant.network import export_graph

    rates = [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")]
    export_graph(model.train(), torch.randn(2, 3, 32, 32))
    assert [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")] == rates and max(rates) > 0.15


def test_a_network_that_draws_random_numbers_while_training_is_refused_for_qat_naming_the_op():
    from train.quant.backend import QuantError
    from train.quant.network import export_graph

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x) if self.training else x

    with pytest.raises(QuantError, match=r"Noisy draws random numbers .*aten\.rand"):
        export_graph(Noisy().train(), torch.randn(2, 3, 8, 8))


def test_a_missing_int8_package_names_the_extra_to_install(monkeypatch):
    import importlib

    from train.quant.backend import QuantError, quantizer

    real = importlib.import_module

    def without_executorch(name, *args):
        if name.startswith("executorch"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_executorch)
    with pytest.raises(QuantError, match=r"needs executorch .*pip install 'mobilenet-train\[int8\]'"):
        quantizer("xnnpack", weight_bits=8, qat=True)


def test_pattern_graphs_are_exported_once_and_handed_out_as_copies():
    import torchao.quantization.pt2e.utils as pt2e_utils
    from torchao.quantization.pt2e.export_utils import WrapperModule

    from train.quant import patterns

    fake_quant()  # prepares a graph: the exporter is memoized from then on
    export = pt2e_utils._get_aten_graph_module_for_pattern
    assert getattr(export, "_memoized", False)

    def conv(x, weight):
        return torch.nn.functional.conv2d(x, weight)

    pattern = WrapperModule(conv)  # as torchao and ExecuTorch hand patterns to the exporter

    inputs = (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1))
    first, second = export(pattern, inputs), export(pattern, (torch.zeros(1, 3, 4, 4), torch.ones(2, 3, 1, 1)))
    assert first is not second and first.code == second.code  # same shapes: one export, two independent copies
    other = export(pattern, (torch.randn(1, 3, 8, 8), torch.randn(2, 3, 1, 1)))  # another shape: its own entry
    keys = [patterns._pattern_key(pattern, i, False, {}) for i in (inputs, (torch.randn(1, 3, 8, 8), inputs[1]))]
    assert keys[0] != keys[1] and all(k in patterns._cache for k in keys) and other is not first


def test_unsupported_backend_or_weight_range_is_refused():
    from train.quant.backend import QuantError, quantizer

    with pytest.raises(QuantError, match="only xnnpack"):
        quantizer("qnnpack", weight_bits=8, qat=True)
    with pytest.raises(QuantError, match="must be 8 or 7"):
        quantizer("xnnpack", weight_bits=4, qat=True)


def test_ptq_moving_average_observer_survives_the_one_outlier_image_that_collapses_the_histogram_one():
    from train.quant.deploy import convert
    from train.quant.recipe import PTQNetwork

    torch.manual_seed(0)
    # A head like MNv4's: conv, ReLU, global pool, 1x1 conv, ReLU, classifier. One calibration image drives the
    # pooled features ~500x past the others' range (seen on MNv4-Conv-S with a real photo, bench.qat_evidence).
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(32, 10)).eval()
    batches = [torch.randn(16, 3, 16, 16) for _ in range(8)]
    batches[5][3] *= 500.0
    x = torch.randn(64, 3, 16, 16)
    with torch.inference_mode():
        ref = model(x)
    errors = {}
    for observer in ("histogram", "moving_average"):
        net = PTQNetwork(model, img_size=16, quant={"backend": "xnnpack", "weight_bits": 8, "ptq_observer": observer})
        with torch.inference_mode():
            for b in batches:
                net.graph(b)
            converted = convert(net.graph)
            errors[observer] = float((converted(x) - ref).abs().mean() / ref.abs().mean())
    # The histogram's range keeps the outlier: typical activations round to a few levels (or to zero); the moving
    # average of per-batch ranges keeps them resolved.
    assert errors["moving_average"] < 0.1 < errors["histogram"], errors


def test_onnxruntime_overflow_is_detected_on_x86_cpus_without_vnni_only(tmp_path):
    from train.quant.backend import onnxruntime_int8_overflows

    def cpu(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
        return path

    assert onnxruntime_int8_overflows(cpu("avx512f"), "x86_64")  # e.g. AMD EPYC (Zen 2/3): AVX2, no VNNI
    assert not onnxruntime_int8_overflows(cpu("avx512f avx512_vnni"), "x86_64")
    assert not onnxruntime_int8_overflows(cpu("avx_vnni"), "x86_64")
    assert not onnxruntime_int8_overflows(cpu(""), "aarch64")
    assert not onnxruntime_int8_overflows(tmp_path / "absent", "x86_64")  # unknown: not assumed affected


def test_a_layer_scale_branch_keeps_its_small_gammas_in_int8_instead_of_rounding_to_zero(monkeypatch):
    """MNv4-Hybrid's layer scale (per-channel gammas initialised at 1e-5) is left float by the quantizer: quantized,
    gamma x activation falls below one int8 step of the product's scale (at least 2^-12) and the branch becomes 0."""
    from timm.layers import LayerScale2d

    from train.quant import backend
    from train.quant.deploy import convert
    from train.quant.network import FakeQuantNetwork

    class Branch(torch.nn.Module):  # conv -> layer scale -> the network's output, as in a hybrid block's branch
        def __init__(self):
            super().__init__()
            self.conv, self.scale = torch.nn.Conv2d(3, 8, 3, padding=1), LayerScale2d(8, init_values=1e-5)

        def forward(self, x):
            return self.scale(self.conv(x)).mean((2, 3))

    def int8_output(float_modules: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(backend, "FLOAT_MODULES", float_modules)
        torch.manual_seed(0)
        model, x = Branch(), torch.randn(8, 3, 16, 16)
        net = FakeQuantNetwork(model, img_size=16, quantizer=backend.quantizer("xnnpack", weight_bits=8, qat=True))
        net.train()(x)  # observers see the data
        with torch.inference_mode():
            return convert(net.eval().graph)(x), model.eval()(x)

    kept, reference = int8_output(backend.FLOAT_MODULES)
    assert torch.allclose(kept, reference, rtol=0.1, atol=1e-7), (kept, reference)  # the branch survives int8
    quantized, _ = int8_output(())
    assert not quantized.any()  # what it was before: rounded to zero


def test_an_unknown_ptq_observer_is_refused():
    from train.quant.backend import QuantError, quantizer

    with pytest.raises(QuantError, match="quant.ptq_observer='percentile': choose one of moving_average"):
        quantizer("xnnpack", weight_bits=8, qat=False, ptq_observer="percentile")


# One model per family, each the smallest of its family; MNv4-Hybrid's attention is what XNNPACK's quantizer
# leaves in float. V3 (mnv3_s_075) is the model of the pipeline runs below (qat_run), which go through the same steps.
FAMILIES = {"v1": "mt_mobilenetv1_025", "v2": "mobilenetv2_035", "v4_conv": "mobilenetv4_conv_small",
            "v4_hybrid": "mobilenetv4_hybrid_medium"}


@pytest.fixture(scope="module")
def real_batch(shapes):
    """The 50 val images of the shapes data at 32 px, through the eval preprocessing, normalised as the module
    does."""
    from data_pipes.image.augment import build_eval_transform
    from data_pipes.stream.datamodule import build_eval_loader
    from train.nets.normalize import normalize

    loader = build_eval_loader(str(shapes), build_eval_transform(32, crop_pct=0.875, interpolation="bilinear",
                                                                     dct_reduce=False),
                               batch_size=50, num_workers=0, max_bad_fraction=0.0)
    batch = next(iter(loader))
    return normalize(batch["image"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), batch["target"]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_fine_tunes_with_fake_quant_converts_and_runs_int8_in_both_runtimes(family, real_batch,
                                                                                        weight_bits, tmp_path):
    from train.nets import create_model, litert
    from train.quant.backend import quantizer
    from train.quant.deploy import OnnxRunner, PteRunner, convert, kept_float, write_onnx, write_pte, write_tflite_int8
    from train.quant.network import FakeQuantNetwork

    x, y = real_batch
    torch.manual_seed(0)
    model = create_model(FAMILIES[family], num_classes=10, drop_rate=0.0)
    # Fit the float model to this batch first: agreement between int8 kernels means something only on confident
    # logits (an untrained network's are near-uniform, and any rounding flips its argmax).
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    # BN running statistics set to this batch's exactly (a cumulative average over one repeated batch), so the
    # model is as confident in eval, which int8 folds into the convolutions, as it is in training.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    # 7-bit weights where onnxruntime's kernels would overflow with 8 (x86 without VNNI): what a user deploying to
    # such CPUs trains with (quant.weight_bits=7).
    net = FakeQuantNetwork(model, img_size=32, quantizer=quantizer("xnnpack", weight_bits=weight_bits, qat=True))
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4)
    for _ in range(20):  # QAT steps: weights, BN statistics and observers adapt to int8 together
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net.train()(x), y).backward()
        opt.step()
    net.eval()
    converted = convert(net.graph)
    pte = write_pte(converted, tmp_path / "model_int8.pte", 32)
    write_onnx(converted, tmp_path / "model_int8.onnx", 32)
    with torch.inference_mode():
        ref = converted(x).argmax(1)
        pte_out = PteRunner(tmp_path / "model_int8.pte", pte.dynamic, 32)(x).argmax(1)
        onnx_out = OnnxRunner(tmp_path / "model_int8.onnx")(x).argmax(1)
    agree = {name: 100.0 * float((out == ref).float().mean()) for name, out in (("pte", pte_out), ("onnx", onnx_out))}
    # Thresholds, top-1 agreement with the converted PyTorch int8 model on these 50 images: ExecuTorch 84 %,
    # onnxruntime 80 %. Measured here (8-bit weights, a CPU with VNNI): 86-100 % (V2-0.35 at 32 px is the lowest); on
    # models trained for real, 94-99.8 % (64 px, 10 classes). With 8-bit weights on a CPU without VNNI, onnxruntime
    # fell to 72 % on V2 (CI), which is why such hosts run this test with 7-bit weights.
    assert agree["pte"] >= 84 and agree["onnx"] >= 80, agree
    assert (ref == y).float().mean() >= 0.8  # QAT kept the int8 model on the batch (measured 88-100 %)
    assert pte.dynamic
    floats = kept_float(converted)
    if family == "v4_hybrid":  # attention stays float, and the report says so
        assert floats.get("scaled_dot_product_attention", 0) > 0, floats
        # LiteRT, from the same graph, follows the PyTorch int8 model: its layer scale is kept float on purpose
        # (train.quant.backend.FLOAT_MODULES; quantized per tensor, the small gammas round to zero and the int8
        # network collapses).
        if litert.available():
            lite = write_tflite_int8(net.graph, tmp_path / "model_int8.tflite", 32)
            assert lite.failure is None, lite.failure
            with torch.inference_mode():
                lite_agree = 100.0 * float((lite.runner(x).argmax(1) == ref).float().mean())
            assert lite_agree >= 84, lite_agree
    else:
        assert not {op for op in floats if op in ("conv2d", "linear")}, floats
