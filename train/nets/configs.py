"""The project's Hydra configs (`conf/`): where they are, the model configs, and the config a run composes.

One place knows where `conf/` is: the zoo reads the model configs from it, the export fills the settings an older
checkpoint predates from the composed defaults, and tests and benchmarks compose runs through `compose_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_pipes.launch import run_name

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TRAIN_CONFIG = "train"  # conf/train.yaml: what `python -m train` and `python -m distill.build` compose

# `${run_name:}` in conf/train.yaml's hydra.run.dir: one name per launch, shared by its processes and its restarts
# (data_pipes.launch.run_name); resolved once per process, as Hydra's own `${now:}` is.
OmegaConf.register_new_resolver("run_name", run_name, use_cache=True, replace=True)


def plain(node: Any) -> Any:
    """A config node as plain Python values (interpolations resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_config_dir() -> Path:
    """conf/model/: one YAML per `model=<key>` choice."""
    return CONF_DIR / "model"


def list_model_configs() -> list[str]:
    """Every `model=<key>` choice, sorted (the file names of conf/model/*.yaml, `timm` included)."""
    directory = model_config_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"model configs not found at {directory}: run from a source checkout of this repo")
    return sorted(path.stem for path in directory.glob("*.yaml"))


def load_model_config(key: str) -> DictConfig:
    """conf/model/<key>.yaml on its own (not composed: nothing else is needed to read a model's paper numbers)."""
    return OmegaConf.load(model_config_dir() / f"{key}.yaml")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/train.yaml with `overrides`, composed as `python -m train` composes it, outside a Hydra app.

    `run_dir` interpolates Hydra's runtime output dir, which exists only inside a Hydra app: override it (or leave
    it unresolved) when composing here."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=TRAIN_CONFIG, overrides=list(overrides))


def remove_if_empty(run_dir: Path) -> None:
    """Hydra makes the run directory before the command's function runs; a command that wrote nothing there (a
    start refused by its preflight, a `distill.build`) leaves none behind, nor an emptied `runs/<model>/`."""
    for directory in (run_dir, run_dir.parent):
        try:
            directory.rmdir()  # only when empty
        except OSError:
            return


def command_line_keys() -> set[str] | None:
    """The config keys the command line set (`key=value`, `+key=value`, `~key`), config groups left out (choosing
    `kd=mnv4` sets no key); None outside a Hydra app (a composed config does not say which values were typed)."""
    if not HydraConfig.initialized():
        return None
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").split("=", 1)[0]
        if key and not key.startswith("hydra.") and not (CONF_DIR / key.replace(".", "/")).is_dir():
            keys.add(key)
    return keys
