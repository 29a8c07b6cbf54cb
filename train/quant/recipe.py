"""`qat=true`: fine-tune a float network of ours with fake quantization, then ship it as int8.

    python -m train model=mnv4_conv_s qat=true init_from=runs/mnv4_conv_s/<time>/export   # or a checkpoint

The float weights come from `init_from` (an export directory or a checkpoint of `python -m train`, checked for the
same architecture and classes); the `quant` config group holds the rest: the quantizer, the lr factor against the
float recipe, the epochs at which BN statistics and then observers freeze, and the agreement each runtime must
reach. The run exports the float model as usual and, next to it, model_int8.pte and model_int8.onnx, each measured
in its own runtime (`train.quant.deploy`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from train.nets.files import METRICS_FILE
from train.nets.load import LoadError, Settings, load_network
from train.nets.normalize import normalize
from train.nets.registry import create_model
from train.quant.backend import QuantError, quantizer, require
from train.quant.deploy import ONNX_FILE, PTE_FILE, TFLITE_FILE, deploy
from train.quant.network import FakeQuantNetwork, export_graph

log = logging.getLogger(__name__)


INIT_FROM = Settings("init_from")  # an export directory or a checkpoint of ours; never a timm name


def load_float(init_from: str | None, *, name: str, label_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The float weights of `init_from` for `name` with these classes (an export dir or a checkpoint of ours;
    `label_names` None: any classes, for a preflight whose data was refused)."""
    if not init_from:
        raise QuantError("qat=true fine-tunes a trained float model: set init_from=<run>/export or a checkpoint "
                         "(<run>/checkpoints/best.ckpt) of the same model")
    path = Path(str(init_from)).expanduser()
    if not path.exists():
        raise QuantError(f"init_from={path} does not exist: give an export directory or a checkpoint of ours")
    try:
        trained = load_network(path, settings=INIT_FROM)
    except LoadError as e:
        raise QuantError(str(e)) from None
    if trained.architecture != name:
        raise QuantError(f"init_from={path} holds {trained.architecture}, but this run's model is {name}: pick the "
                         f"model= it was trained as, or another init_from")
    labels = list(trained.label_names)
    if labels and label_names is not None and labels != list(label_names):
        raise QuantError(f"init_from={path} was trained on {len(labels)} classes ({', '.join(labels[:3])}, ...), "
                         f"this data has {len(label_names)} ({', '.join(list(label_names)[:3])}, ...): QAT needs "
                         f"the float model's own classes")
    return trained.model.state_dict()


def build_network(model: nn.Module, *, init_from: str | None, name: str, label_names: Sequence[str], img_size: int,
                  quant: Mapping[str, Any]) -> FakeQuantNetwork:
    """The fake-quant network of `model` with init_from's float weights."""
    state = load_float(init_from, name=name, label_names=label_names)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise QuantError(f"init_from={init_from}: its weights do not fit {name} with {len(label_names)} classes: "
                         f"{str(e)[:400]}") from None
    return FakeQuantNetwork(model, img_size=img_size, quantizer=qat_quantizer(quant))


def qat_quantizer(quant: Mapping[str, Any]):
    """The QAT quantizer of the `quant` settings."""
    return quantizer(str(quant["backend"]), weight_bits=int(quant["weight_bits"]), qat=True)


def restore_network(name: str, num_classes: int, img_size: int, quant: Mapping[str, Any],
                    state: Mapping[str, torch.Tensor], network_args: Mapping[str, Any]) -> FakeQuantNetwork:
    """The fake-quant network of a QAT checkpoint (`state`: its network's weights, observers and freeze flags;
    `network_args`: what the run created the network with, `train.nets.load.network_args`). Its graph must be the
    run's: a dropout above zero, for one, is an op with an observer of its own."""
    net = FakeQuantNetwork(create_model(name, num_classes=num_classes, **network_args), img_size=img_size,
                           quantizer=qat_quantizer(quant))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise QuantError(f"the QAT checkpoint does not fit a fresh {name} fake-quant network: {str(e)[:400]}") \
            from None
    return net.eval()


class QATSchedule(L.Callback):
    """Freezes BN running statistics from epoch `freeze_bn_epoch` and observers from `freeze_observer_epoch`
    (torchvision's QAT reference: 3 and 4), at the start of those epochs; frozen state is in checkpoints."""

    def __init__(self, freeze_bn_epoch: int | None, freeze_observer_epoch: int | None) -> None:
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.model
        epoch = trainer.current_epoch
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch and not net.bn_frozen:
            net.freeze_bn()
            log.info("qat: BN statistics frozen from epoch %d", epoch)
        if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch and not net.observers_frozen:
            net.freeze_observers()
            log.info("qat: observers frozen from epoch %d", epoch)


def float_model(net: FakeQuantNetwork, name: str, num_classes: int) -> nn.Module:
    """The float network with the fine-tuned weights (for the float export next to the int8 files)."""
    model = create_model(name, num_classes=num_classes)
    model.load_state_dict(net.float_state_dict(), strict=True)
    return model.eval()


def export_int8(net: FakeQuantNetwork | PTQNetwork, float_net: nn.Module, export_dir: Path, batches: Iterable, *,
                img_size: int, mean: Sequence[float], std: Sequence[float], num_classes: int,
                min_agreement: Mapping[str, float], max_top1_drop: float, latency: bool, tflite: bool):
    """model_int8.pte / model_int8.onnx (and with `tflite`, model_int8.tflite) into `export_dir` (beside the float
    export) and their measurements merged into its metrics.json; returns the `Int8Report`."""
    export_dir = Path(export_dir)
    with tempfile.TemporaryDirectory(dir=export_dir.parent, prefix=".int8-") as stage:
        stage = Path(stage)
        net = net.cpu()
        fake_quant = None if isinstance(net, PTQNetwork) else net  # a calibrated PTQ graph computes in float
        report = deploy(net.graph, fake_quant, float_net.cpu(), stage, batches, img_size=img_size, mean=mean,
                        std=std, num_classes=num_classes, min_agreement=min_agreement, max_top1_drop=max_top1_drop,
                        latency=latency, tflite=tflite)
        metrics_file = export_dir / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        for key, value in report.metrics.items():  # nested figures (sizes, latencies) join the float export's
            metrics[key] = {**metrics[key], **value} if isinstance(value, dict) and isinstance(metrics.get(key),
                                                                                              dict) else value
        metrics["int8_failures"] = report.failures
        for name in (PTE_FILE, ONNX_FILE, TFLITE_FILE):
            if (stage / name).is_file():
                (stage / name).replace(export_dir / name)
            else:  # LiteRT made none this time (not installed, or it failed: metrics.json says which)
                (export_dir / name).unlink(missing_ok=True)
        tmp = export_dir / f".{METRICS_FILE}.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(metrics_file)
    m = report.metrics
    fake = f", fake-quant {m['fakequant_top1']:.2f}" if "fakequant_top1" in m else ""
    log.info("int8: float %.2f%s, int8 PyTorch %.2f, ExecuTorch %.2f (agreement %.1f%%), onnxruntime %.2f (agreement "
             "%.1f%%) top-1 on %d images", m["float_top1"], fake, m["int8_torch_top1"], m["int8_pte_top1"],
             m["int8_pte_agreement"], m["int8_onnx_top1"], m["int8_onnx_agreement"], m["val_images"])
    if "int8_tflite_top1" in m:
        log.info("int8: LiteRT %.2f (agreement %.1f%%) top-1", m["int8_tflite_top1"], m["int8_tflite_agreement"])
    return report


class PTQNetwork(nn.Module):
    """Post-training quantization: the float network exported in eval mode, observers inserted
    (`prepare_pt2e`), calibrated on training images with the eval preprocessing, then observers off."""

    def __init__(self, model: nn.Module, *, img_size: int, quant: Mapping[str, Any]) -> None:
        super().__init__()
        quantize = require("torchao.quantization.pt2e.quantize_pt2e")
        q = quantizer(str(quant["backend"]), weight_bits=int(quant["weight_bits"]), qat=False,
                      ptq_observer=str(quant["ptq_observer"]))
        self.graph = quantize.prepare_pt2e(export_graph(model.eval(), torch.randn(2, 3, img_size, img_size)), q)

    def calibrate(self, batches: Iterable, *, mean: Sequence[float], std: Sequence[float], limit: int) -> int:
        """Run up to `limit` batches through the observers; returns the images seen."""
        seen = used = 0
        with torch.inference_mode():
            for batch in islice(batches, limit):
                valid = batch["valid"].to(torch.bool)
                self.graph(normalize(batch["image"][valid], mean, std))
                seen, used = seen + int(valid.sum()), used + 1
        if seen == 0:
            raise QuantError("PTQ calibration saw no image: check the train split of the data root")
        self.graph.apply(require("torchao.quantization.pt2e").disable_observer)
        log.info("ptq: calibrated on %d training images (%d batches)", seen, used)
        return seen

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True) -> PTQNetwork:
        self.training = mode  # the graph was exported in eval mode and stays so: PTQ never trains
        return self
