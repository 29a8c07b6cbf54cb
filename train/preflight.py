"""One preflight before anything of a start is written: every problem it can see, each with its fix, at once.

`python -m train` runs it before a run directory, a W&B segment or a log file exists; on a problem it exits 2 with
the whole list and no traceback. The checks run in the order a run would meet them (config values, the model, the
data, the resume, then each feature's inputs: teacher, kd sets, `init_from`); a check that needs what an earlier one
refused (the batch against the split needs the data) is skipped then, so every problem is named once, by its cause.
A check is either a plain test here or the same code the run uses later, whose `UserError` is collected: the
message a user reads is the one the run would have stopped with, only sooner and together with the others.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from data_pipes.errors import Problems, UserError
from data_pipes.shards.metadata import DatasetInfo
from data_pipes.shards.prepare import prepare_dataset
from data_pipes.stream.plan import train_batches_per_rank
from train.cluster import topology
from train.cluster.resume import check_start, resolve_ckpt_path
from train.nets import check_model_name
from train.nets.compiled import MODES
from train.nets.configs import CONF_DIR, compose_config, plain


@dataclass(frozen=True)
class Cleared:
    """What the preflight established, for the run to use rather than work out again."""

    info: DatasetInfo
    ckpt_path: str | None


# ------------------------------------------------------------------------------------------------ config values

def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# key -> (accepts the value, what it must be, an example that works). Only values whose mistake would otherwise
# surface late (a traceback mid-run) or never (a silent fallback); timm and Lightning check the rest themselves.
RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "data.batch_size": (lambda v: _int(v) and v >= 1, "an int >= 1 (samples per device)", "128"),
    "data.val_batch_size": (lambda v: v is None or (_int(v) and v >= 1), "null or an int >= 1", "null"),
    "data.num_workers": (lambda v: _int(v) and v >= 0, "an int >= 0 (0: load in the main process)", "8"),
    "data.img_size": (lambda v: v is None or (_int(v) and v >= 1), "null (the model's resolution) or an int >= 1",
                      "224"),
    "data.shuffle_window": (lambda v: _int(v) and v >= 1, "an int >= 1", "1024"),
    "data.max_bad_fraction": (lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1]", "0.001"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)", "0.1"),
    "ema.decay": (lambda v: v is None or (_number(v) and 0 < v < 1), "null (no EMA) or in (0, 1)", "0.9998"),
    "seed": (_int, "an int", "42"),
    "distill": (lambda v: isinstance(v, bool), "true or false", "true"),
    "qat": (lambda v: isinstance(v, bool), "true or false", "true"),
    "export": (lambda v: isinstance(v, bool), "true or false", "true"),
    "compile": (lambda v: isinstance(v, bool), "true or false", "true"),
    "compile_mode": (lambda v: v in MODES, f"one of torch.compile's modes: {', '.join(MODES)}", "default"),
    "trainer.devices": (lambda v: v == "auto" or (_int(v) and v >= 1) or (isinstance(v, ListConfig) and len(v) > 0),
                        "auto, a count >= 1 or a list of device indices", "auto"),
    "trainer.max_epochs": (lambda v: v is None or (_int(v) and (v >= 1 or v == -1)), "an int >= 1 (or -1)", "100"),
    "trainer.max_steps": (lambda v: _int(v) and (v >= 1 or v == -1), "an int >= 1, or -1 (run max_epochs)", "-1"),
    "trainer.accumulate_grad_batches": (lambda v: _int(v) and v >= 1, "an int >= 1", "1"),
    "trainer.log_every_n_steps": (lambda v: _int(v) and v >= 1, "an int >= 1", "50"),
    "callbacks.requeue.check_every_n_steps": (lambda v: _int(v) and v >= 1, "an int >= 1", "10"),
    "optim.lr": (lambda v: v is None or (_number(v) and v > 0), "a positive number", "1e-3"),
}
KD_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "kd.top_k": (lambda v: _int(v) and v >= 1, "an int >= 1", "10"),
    "kd.temperature": (lambda v: v is None or (_number(v) and v > 0), "a positive number", "1.0"),
}


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, (DictConfig, Mapping)) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_required(cfg: DictConfig) -> None:
    """Values the config marks `???` (model=timm's model.name): nothing else can be read before they are set."""
    problems = Problems("the run could start")
    for key in _missing(OmegaConf.to_container(cfg, resolve=False), ""):
        example = " (a timm model name, e.g. model.name=efficientnet_b0)" if key == "model.name" else ""
        problems.add(f"{key} is required and not set: pass {key}=<value>{example}")
    problems.raise_if_any()


def _missing(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def check_values(cfg: DictConfig, problems: Problems) -> None:
    rules = {**RULES, **(KD_RULES if cfg.get("distill") else {})}
    for key, (accepts, must, example) in rules.items():
        value = _get(cfg, key)
        if value is not _MISSING and not accepts(value):
            problems.add(f"{key}={value!r}: must be {must}; e.g. {key}={example}")
    if cfg.get("distill"):
        sources = plain(_get(cfg, "kd.sources")) if _get(cfg, "kd.sources") is not _MISSING else None
        for name, source in (sources or {}).items():
            weight = (source or {}).get("weight")
            if weight is not None and not (_number(weight) and weight >= 0):
                problems.add(f"kd.sources.{name}.weight={weight!r}: must be a number >= 0 (0 leaves the source out)")
            replicas = (source or {}).get("replicas")
            if replicas is not None and not (_int(replicas) and replicas >= 1):
                problems.add(f"kd.sources.{name}.replicas={replicas!r}: must be an int >= 1")
        weights = [(s or {}).get("weight") or 0 for s in (sources or {}).values()]
        if sources and all(_number(w) for w in weights) and sum(weights) <= 0:
            problems.add("every kd.sources.*.weight is 0: the batches would hold nothing; give one a weight > 0, "
                         "e.g. kd.sources.d1.weight=1")


def check_combinations(cfg: DictConfig, problems: Problems) -> None:
    """Settings that are each valid but do not go together, or do not fit this machine."""
    if cfg.get("init_from") and not cfg.get("qat"):
        problems.add(f"init_from={cfg.init_from} is read by qat=true only (the float model it fine-tunes with fake "
                     f"quantization): add qat=true, or drop init_from")
    accelerator, precision = str(cfg.trainer.get("accelerator", "auto")), str(cfg.trainer.get("precision", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.add(f"trainer.accelerator={accelerator}, but torch sees no CUDA GPU here (torch.cuda.is_available() "
                     f"is False; torch {torch.__version__}): use trainer.accelerator=auto (the CPU here) or run on a "
                     f"GPU node")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision in ("16", "16-mixed", "16-true"):
        problems.add(f"trainer.precision={precision} needs a GPU; on the CPU use bf16-mixed or 32-true (auto picks "
                     f"bf16-mixed on a GPU that has it, else 32-true)")


def trainer_arguments() -> set[str]:
    return {name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"}


def check_trainer_keys(cfg: DictConfig, problems: Problems) -> None:
    """A key under `trainer` that lightning.Trainer does not take (`+trainer.max_epoch=1`), with the close ones."""
    valid = trainer_arguments()
    for key in cfg.trainer:
        if key not in valid:
            problems.add(unknown_key_message(f"trainer.{key}", sorted(f"trainer.{k}" for k in valid),
                                             what="an argument of lightning.Trainer"))


def unknown_key_message(key: str, valid: list[str], *, what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the keys are: {', '.join(valid)}"
    return f"{key} is not {what}: {hint}"


# ------------------------------------------------------------------------------------------------ data and resume

def world_size(cfg: DictConfig) -> int:
    """The processes the run will have, as far as the config and the launch say (1 where only Lightning knows)."""
    trainer = plain(cfg.trainer)
    try:
        nodes, devices = topology.resolve(trainer.get("num_nodes", 1), trainer.get("devices", "auto"))
    except UserError:
        return 1
    per_node = len(devices) if isinstance(devices, (list, tuple)) else devices if _int(devices) and devices > 0 else 1
    return max(1, int(nodes) if _int(nodes) else 1) * per_node


def check_batches(cfg: DictConfig, info: DatasetInfo, problems: Problems) -> None:
    batch = cfg.data.batch_size
    if not (_int(batch) and batch >= 1) or cfg.get("distill") and cfg.kd.get("epoch_samples"):
        return  # the value itself was refused above; a kd stream's epoch is checked by its own plan
    world, train = world_size(cfg), info.split("train").num_samples
    if train_batches_per_rank(train, world, batch) == 0:
        fits = max(1, train // world)
        problems.add(f"data.batch_size={batch} on {world} process{'es' if world > 1 else ''} needs at least "
                     f"{batch * world} train images, {info.root} has {train}: a rank would get no batch; use "
                     f"data.batch_size={min(batch, fits)} or less")


def check_resume(cfg: DictConfig, run_dir: Path, info: DatasetInfo | None, problems: Problems) -> str | None:
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    with problems.collect():  # without data (refused above) the checkpoint is still found, read and compared
        check_start(ckpt_path, run_dir, model_name=cfg.model.name, qat=cfg.qat,
                    label_names=None if info is None else info.label_names,
                    data_root=None if info is None else info.root)
    return ckpt_path


# ------------------------------------------------------------------------------------------------ the preflight

def preflight(cfg: DictConfig, features) -> Cleared:
    """Every check, in order; raises `Problems` (a UserError) with all that were found, else returns what it read.

    Writes nothing, except the demo's synthetic dataset (`data.synthetic`), made only when every check before it
    passed. `features`: the run's `train.features.Features`, whose `preflight` checks their own inputs."""
    problems = Problems("the run could start")
    check_values(cfg, problems)
    check_combinations(cfg, problems)
    check_trainer_keys(cfg, problems)
    with problems.collect():
        check_model_name(cfg.model.name)
    info = None
    synthetic = plain(cfg.data.synthetic)
    if not (synthetic and problems.found):  # the demo's data is made only for a start that can go on
        with problems.collect():
            info = prepare_dataset(cfg.data.root, synthetic=synthetic)
    if info is not None:
        check_batches(cfg, info, problems)
    ckpt_path = check_resume(cfg, Path(str(cfg.run_dir)), info, problems)
    features.preflight(problems, info=info, trainer=plain(cfg.trainer))
    problems.raise_if_any()
    assert info is not None
    return Cleared(info=info, ckpt_path=ckpt_path)


# ------------------------------------------------------------------------------------------------ the command line

_PLAIN_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=")
_NOT_IN_STRUCT = re.compile(r"Key '([^']+)' is not in struct")
_COULD_NOT = re.compile(r"Could not override '([^']+)'")
_NO_OPTION = re.compile(r"Could not find '([\w/]+)/([^'/]+)'")


def command_line_problem(argv: Sequence[str]) -> str | None:
    """What Hydra would answer with a traceback or a poor hint, said before it starts: a `key=value` whose key the
    config lacks (`trainer.max_epoch=1`: the close valid keys, where Hydra suggests `+key=value`, which then fails
    in the Trainer), a group option that does not exist (`model=mnv4_conv_x`: the close ones), a required value
    left unset (model=timm without model.name). None when there is none of these (Hydra reports anything else)."""
    overrides = [a for a in argv if _PLAIN_OVERRIDE.match(a) and not a.startswith("hydra.")]
    if not overrides:
        return None
    try:
        composed = compose_config(overrides)
    except Exception as e:  # Hydra's ConfigCompositionException (and OmegaConf's cause): read its message
        text = f"{e} {e.__cause__ or ''}"
    else:  # a `???` value Hydra would meet resolving the run directory (model=timm without model.name)
        try:
            check_required(composed)
        except Problems as e:
            return "; ".join(e.found)
        return None
    missing = _NO_OPTION.search(text)
    if missing is not None:  # model=mnv4_conv_x, experiment=mnv4_conv_s: an option the group lacks
        group, option = missing.group(1), missing.group(2)
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else \
            f"the choices are: {', '.join(options)}"
        return f"{group}={option} is not a choice of conf/{group}/: {hint}"
    bad = _COULD_NOT.search(text) or _NOT_IN_STRUCT.search(text)
    if bad is None:
        return None
    key = bad.group(1)
    others = [a for a in overrides if _PLAIN_OVERRIDE.match(a).group(1) != key]
    try:
        cfg = compose_config(others)
    except Exception:
        return None
    parent, _, leaf = key.rpartition(".")
    node = _get(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    valid = sorted(f"{parent}.{k}" if parent else str(k) for k in node)
    hint = difflib.get_close_matches(key, valid, n=3, cutoff=0.75)
    fix = f"did you mean {' or '.join(hint)}?" if hint else f"the keys{f' under {parent}' if parent else ''} are: " \
        f"{', '.join(valid)}"
    return f"{key} is not a config key: {fix} (`python -m train --cfg job` prints the whole config)"
