"""`qat=true`: fine-tune a float network of ours with fake quantization, and ship it as int8 (the `quant` group).

It contributes the fake-quantized network (from `init_from`'s float weights), a fraction of the recipe's lr, fp32
training (observers see fp32 ranges), the callback that freezes BN statistics and then observers, the float network
of the fine-tuned weights as the float export, and the int8 files beside it, each measured in its own runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import Callback
from omegaconf import DictConfig
from torch import nn

from data_pipes.errors import Problems
from data_pipes.shards.metadata import DatasetInfo
from train.features.base import ExportContext, Feature
from train.nets.configs import plain
from train.quant.backend import QuantError
from train.quant.recipe import QATSchedule, build_network, export_int8, float_model, load_float
from train.tracking.loggers import record_summary

FP32 = ("auto", "32", "32-true")


class QuantizationAware(Feature):
    def __init__(self, *, init_from: str | None, model_name: str, quant: Mapping[str, Any]) -> None:
        self.init_from, self.model_name, self.quant = init_from, model_name, dict(quant)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> QuantizationAware:
        return cls(init_from=cfg.init_from, model_name=str(cfg.model.name), quant=plain(cfg.quant))

    def preflight(self, problems: Problems, *, info: DatasetInfo | None, trainer: Mapping[str, Any]) -> None:
        with problems.collect():
            self.trainer(dict(trainer))
        with problems.collect():  # the float model QAT starts from: set, ours, the same model and classes
            load_float(self.init_from, name=self.model_name,
                       label_names=info.label_names if info is not None else None)

    def wrap_network(self, model: nn.Module, *, img_size: int, info: DatasetInfo) -> nn.Module:
        return build_network(model, init_from=self.init_from, name=self.model_name, label_names=info.label_names,
                             img_size=img_size, quant=self.quant)

    def optimizer(self, optim: dict[str, Any], sched: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        # QAT fine-tunes at a fraction of the float recipe's lr (its warm-up and floor included).
        scale = float(self.quant["lr_scale"])
        optim = {**optim, "lr": optim["lr"] * scale}
        sched = {**sched, **{k: sched[k] * scale for k in ("warmup_lr", "min_lr") if sched.get(k)}}
        return optim, sched

    def trainer(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # Fake quantization simulates int8 arithmetic in fp32; the observers must see fp32 ranges.
        if kwargs.get("precision") not in FP32:
            raise QuantError(f"qat=true trains in fp32; trainer.precision={kwargs.get('precision')} would change "
                             f"the ranges the observers see: drop the override (auto picks 32-true)")
        return {**kwargs, "precision": "32-true"}

    def callbacks(self) -> list[Callback]:
        return [QATSchedule(self.quant["freeze_bn_epoch"], self.quant["freeze_observer_epoch"])]

    def shipped_network(self, trained: nn.Module, *, num_classes: int) -> nn.Module:
        return float_model(trained, self.model_name, num_classes)

    def export(self, context: ExportContext) -> dict[str, Any]:
        size = int(context.data_config["input_size"][-1])
        int8 = export_int8(context.trained, context.shipped, context.export_dir, context.val_batches, img_size=size,
                           mean=context.data_config["mean"], std=context.data_config["std"],
                           num_classes=context.num_classes, min_agreement=self.quant["min_agreement"],
                           max_top1_drop=float(self.quant["max_top1_drop"]), latency=bool(self.quant["latency"]),
                           tflite=context.tflite)
        for failure in int8.failures:
            record_summary(context.loggers, {"export/int8_failure": failure})
        for key in ("int8_kept_float", "pte_outside_xnnpack", "int8_tflite_outside_xnnpack",
                    "int8_tflite_float_ops"):  # what stayed float, where the backend kept it so
            if int8.metrics.get(key):
                record_summary(context.loggers, {f"export/{key}": ", ".join(f"{k} x{n}"
                                                                            for k, n in int8.metrics[key].items())})
        return int8.metrics

