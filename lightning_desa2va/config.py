"""Compose, validate and save run configs (Hydra compose API on OmegaConf).

The packaged tree ``lightning_desa2va/configs`` has one group per swappable component; experiment YAMLs in
``experiments/`` are registered as the ``experiment`` group, so ``experiment=desa2va_tiny`` applies one.
Hydra already rejects overrides of keys that do not exist; :func:`validate_config` adds the checks Hydra
cannot make on plain YAML: every key of a ``_target_`` node must be an argument of that target, its value must
fit the argument's type hint, and numbers must lie in their range
(:data:`~lightning_desa2va.config_bounds.VALUE_BOUNDS`, declared beside the schema). Errors name the full key.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pydantic
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lightning_desa2va.config_bounds import bound_violation
from lightning_desa2va.files import atomic_write_text

CONFIG_MODULE = "lightning_desa2va.configs"
HYDRA_VERSION_BASE = "1.3"
EXPERIMENT_GROUP = "experiment"
DEFAULT_EXPERIMENTS_DIR = Path("experiments")
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
SHIPPED_FOUNDATIONS_DIR = Path(str(files("lightning_desa2va"))) / "weights" / "tiny"
CONFIGS_DIR = Path(str(files("lightning_desa2va"))) / "configs"
RECIPES_DIR = CONFIGS_DIR / "recipes"
DEFAULT_EXPERIMENT = "default"
RUN_KEY = "run"
STAGE_OVERRIDES_KEY = "stage_overrides"
HYDRA_KEY = "hydra"

# `${shipped_foundations:}` in a config is the folder of the tiny foundations that ship with the package.
OmegaConf.register_new_resolver("shipped_foundations", lambda: str(SHIPPED_FOUNDATIONS_DIR), replace=True)
# `${sum:a,b}`: a value derived from others, e.g. the Sa2VA control's steps from the default's stages.
OmegaConf.register_new_resolver("sum", lambda *values: sum(values), replace=True)


class ConfigError(ValueError):
    """A config key that is unknown to its component or holds a value of the wrong type."""


@dataclass
class PathsConfig:
    """Where a run reads data and writes its outputs."""

    data_dir: str = "data/shapes"
    output_dir: str = "outputs"
    foundations_dir: str = "${shipped_foundations:}"
    weights_dir: str = "weights"
    """Real checkpoints (a VLM's save_pretrained folder, SAM-2 .pt files): docs/real_weights.md."""


@dataclass
class PipelineConfig:
    """The stages a full run (``desa2va demo``, a sweep trial) trains, in order; each later stage starts from
    the checkpoint of the one before."""

    stages: list[str] = field(default_factory=lambda: ["text_pretrain", "decoupled_finetune"])
    steps: dict[str, int] = field(default_factory=dict)
    """Training steps by stage (the stages' ``trainer.max_steps``), set in one place so that a control with
    fewer stages can take their sum (``experiments/sa2va_baseline.yaml``)."""
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Hydra overrides by stage name, applied whenever that stage is composed (before the command line's):
    an experiment's values for one stage only, e.g. stage 2's LoRA rank, which stage 1 has no key for."""


@dataclass
class SyntheticShardsConfig:
    """How many synthetic videos the demo writes when ``paths.data_dir`` has no shards yet."""

    videos: dict[str, int] = field(default_factory=lambda: {"train": 400, "val": 40, "test": 40})
    seed: int = 0
    videos_per_shard: int = 100
    generator: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunInfo:
    """What a run was composed from, recorded by :func:`compose_config` (not set by hand): the experiment,
    the variant chosen in every config group and the overrides given, for run folders, names and tags."""

    experiment: str = DEFAULT_EXPERIMENT
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """Schema of the top level: unknown top-level keys and mistyped scalars fail at compose time."""

    stage: Any = None
    model: Any = None
    decoupler: Any = None
    text_prompt: Any = None
    visual_prompt: Any = None
    fusion: Any = None
    motion_cue: Any = None
    motion_prompt: Any = None
    loss: Any = None
    eval: Any = None
    data: Any = None
    trainer: Any = None
    strategy: Any = None
    logger: Any = None
    synthetic: SyntheticShardsConfig = field(default_factory=lambda: SyntheticShardsConfig())
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    num_threads: int | None = None
    resume_from: str | None = None
    resume: str | None = None
    """``auto``: continue the newest unfinished run of the same experiment (and config), else start one."""
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig())
    run: RunInfo = field(default_factory=RunInfo)


RESUME_CHOICES = (None, "auto")


def register_experiments(experiments_dir: Path) -> list[str]:
    """Register every ``*.yaml`` in ``experiments_dir`` as an option of the ``experiment`` group."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(experiments_dir.glob("*.yaml")):
        store.store(group=EXPERIMENT_GROUP, name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


@contextmanager
def config_module(module: str, version_base: str) -> Iterator[None]:
    """Hydra initialised on ``module`` for the block, restoring whatever was initialised before.

    ``import sam2`` initialises Hydra on sam2's own configs at import time, so both this project's
    compose and SAM-2's builder need to borrow the global Hydra state and hand it back.
    """
    global_hydra = GlobalHydra.instance()
    previous = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_module(module, version_base=version_base):
            yield
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def compose_config(overrides: list[str] | None = None, experiments_dir: Path | None = None) -> DictConfig:
    """Compose the run config from the packaged defaults, an experiment and Hydra-syntax overrides."""
    experiments_dir = experiments_dir or DEFAULT_EXPERIMENTS_DIR
    known = register_experiments(experiments_dir)
    overrides = list(overrides or [])
    for override in overrides:
        key, _, name = override.partition("=")
        if key == EXPERIMENT_GROUP and name not in known:
            raise ConfigError(
                f"{override}: no {name}.yaml in {experiments_dir.resolve()} (experiments: "
                f"{', '.join(known) or 'none'}); run from the repository root or pass --experiments-dir"
            )
    with config_module(CONFIG_MODULE, HYDRA_VERSION_BASE):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        stage_overrides = cfg.pipeline.get(STAGE_OVERRIDES_KEY, {}).get(cfg.hydra.runtime.choices.stage)
        if stage_overrides:
            overrides = [*stage_overrides, *overrides]
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {
        group: str(choice)
        for group, choice in cfg.hydra.runtime.choices.items()
        if choice is not None and not group.startswith(HYDRA_KEY) and group != EXPERIMENT_GROUP
    }
    experiment = cfg.hydra.runtime.choices.get(EXPERIMENT_GROUP) or DEFAULT_EXPERIMENT
    with open_dict(cfg):
        del cfg[HYDRA_KEY]
        cfg[RUN_KEY] = {"experiment": experiment, "choices": choices, "overrides": overrides}
    validate_config(cfg)
    return cfg


def config_groups() -> dict[str, list[str]]:
    """Every config group of the packaged tree and its variants (the YAML files in its folder)."""
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(CONFIGS_DIR.iterdir())
        if folder.is_dir() and folder != RECIPES_DIR and any(folder.glob("*.yaml"))
    }


def validate_config(cfg: DictConfig) -> None:
    """Check the top level against :class:`RunConfig`, every ``_target_`` node against its target and the
    numbers against their bounds."""
    top_level = OmegaConf.to_container(cfg, resolve=False)
    try:
        OmegaConf.merge(OmegaConf.structured(RunConfig), top_level)
    except Exception as error:  # OmegaConf raises several error types, all naming the key
        raise ConfigError(f"invalid run config: {error}") from error
    if cfg.get("resume") not in RESUME_CHOICES:
        raise ConfigError(f"config key 'resume' has value {cfg.resume!r}: use resume=auto (or leave it null)")
    _validate_node(cfg, "")
    violation = bound_violation(OmegaConf.to_container(cfg, resolve=True))
    if violation is not None:
        raise ConfigError(violation)


def _validate_node(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _validate_target_node(node, path)
        for key in node:
            _validate_node(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node._iter_ex(resolve=False)):
            _validate_node(item, f"{path}[{index}]")


def _validate_target_node(node: DictConfig, path: str) -> None:
    target = node._get_node("_target_")._value()
    try:
        obj = get_object(target)
    except Exception as error:
        raise ConfigError(f"{path}._target_: cannot import '{target}': {error}") from error
    function = obj.__init__ if inspect.isclass(obj) else obj
    parameters = inspect.signature(obj).parameters
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable annotations in a third-party target: check names only
        hints = {}
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        full_key = f"{path}.{key}" if path else str(key)
        if key not in parameters:
            if takes_any_keyword:
                continue
            accepted = ", ".join(name for name in parameters if name not in ("self", "args", "kwargs"))
            raise ConfigError(f"unknown config key '{full_key}': {target} accepts {accepted}")
        value = OmegaConf.select(node, str(key), throw_on_missing=False)
        if key not in hints or value is None or _holds_target(value):
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        _check_type(full_key, value, hints[key])


def _holds_target(value: Any) -> bool:
    """Whether a value is, or contains, a node that Hydra will instantiate (checked on its own)."""
    if isinstance(value, DictConfig):
        return "_target_" in value or any(_holds_target(value._get_node(key)) for key in value)
    if isinstance(value, ListConfig):
        return any(_holds_target(item) for item in value._iter_ex(resolve=False))
    return False


def _check_type(full_key: str, value: Any, hint: Any) -> None:
    try:
        adapter = pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # an annotation pydantic cannot model: nothing to check against
        return
    try:
        adapter.validate_python(value)
    except pydantic.ValidationError as error:
        expected = getattr(hint, "__name__", str(hint))
        raise ConfigError(
            f"config key '{full_key}' has value {value!r} of type {type(value).__name__}, expected {expected}"
        ) from error


def save_config(cfg: DictConfig, path: Path) -> Path:
    """Write the resolved config next to a run's outputs, so the run can be reproduced from it alone."""
    return atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
