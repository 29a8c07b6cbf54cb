"""Optional features of a run as components: one object per option, each contributing its parts to the assembly.

    base     `Feature` (every hook a run asks a feature for, each adding nothing by default) and `Features`
    distill  `distill=true`: teacher-labelled data, the KD objective, validation beside the teacher
    qat      `qat=true`: the fake-quantized network, fp32, the freeze schedule, int8 exports
    compile  `compile=true`: the network compiled by torch.compile, watched for recompiles, shipped plain

`train.run.train` asks the chosen features for each part in turn (the network's rates, the network, the data and
objective, optimizer settings, Trainer arguments, callbacks, what to record, the export), so it has no feature
`if`s; `build_features` is the one place where the config's switches choose them.
"""

from __future__ import annotations

from omegaconf import DictConfig

from train.features.base import DataParts, ExportContext, Feature, Features
from train.features.compile import Compilation
from train.features.distill import KnowledgeDistillation
from train.features.qat import QuantizationAware

__all__ = ["Compilation", "DataParts", "ExportContext", "Feature", "Features", "KnowledgeDistillation",
           "QuantizationAware", "build_features"]


def build_features(cfg: DictConfig) -> Features:
    """The features the config switches on (`distill`, `qat`, `compile`: plain booleans), in the order they apply
    (compile last: it compiles the network the others made)."""
    chosen = {"distill": KnowledgeDistillation.from_config, "qat": QuantizationAware.from_config,
              "compile": Compilation.from_config}
    return Features(make(cfg) for switch, make in chosen.items() if cfg[switch])
