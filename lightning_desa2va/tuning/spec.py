"""Sweep specs: ``sweeps/*.yaml`` read into :class:`SweepSpec`, checked before any trial starts.

A spec names the base experiment and overrides, the search space (any config key: ``categorical``, ``int``,
``float``, ``log_float``), the sampler and pruner, how many trials and seeds, the metric(s) and direction(s),
the confirmation on test and where the study is stored. ``profiles`` hold partial specs merged over the spec
(``--profile quick``). OmegaConf checks the fields' types against the dataclasses; :func:`check_spec` adds
what types cannot say. Every error names the spec file and the field (with "did you mean" for a near miss),
and nothing here imports the model stack: a bad spec fails in about a second.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_desa2va.config import ConfigError
from lightning_desa2va.tuning.metric_names import TRIAL_MEASURES, did_you_mean, unknown_metric

DEFAULT_PROFILE = "default"
JOURNAL_SUFFIX = ".journal"
STORAGE_FILE = "optuna.db"
SEED_PARAM = "seed"
PARAM_SEPARATOR = " "


class SweepSpecError(ConfigError):
    """A sweep spec that cannot run: names the file and the field."""


class Sampler(Enum):
    tpe = "tpe"
    random = "random"
    grid = "grid"
    cmaes = "cmaes"


class Pruner(Enum):
    median = "median"
    hyperband = "hyperband"
    threshold = "threshold"
    none = "none"


class Direction(Enum):
    maximize = "maximize"
    minimize = "minimize"


class ParamType(Enum):
    categorical = "categorical"
    int = "int"
    float = "float"
    log_float = "log_float"


@dataclass
class ParamSpec:
    """One searched parameter. Its name is the config key it sets (``loss.w_orth``, ``decoupler``), unless
    ``bundles`` maps a choice to the overrides it stands for (``sa2va_baseline:
    [experiment=sa2va_baseline]``).
    """

    type: ParamType = MISSING
    choices: list[Any] | None = None
    bundles: dict[str, list[str]] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    step: float | None = None


@dataclass
class ConfirmSpec:
    """Choose on val, confirm on test: a study that is not an ablation never scores test per trial; at its
    end the ``top`` best configurations by validation are trained again with ``seeds`` seeds, on test."""

    top: int = 1  # 0: no confirmation runs
    seeds: int | None = None  # null: the study's seeds


@dataclass
class StatsSpec:
    """The bootstrap behind every interval and paired comparison of the study's tables."""

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class SweepSpec:
    """What ``desa2va sweep`` runs: an Optuna study whose every trial is a :func:`run_pipeline` call."""

    name: str = MISSING  # the study's name (default: the file's stem, with the profile after a dash)
    experiment: str = MISSING  # the base experiment (experiments/<name>.yaml)
    overrides: list[str] = field(default_factory=list)  # applied to every trial, before the sampled values
    space: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: Sampler = Sampler.tpe
    sampler_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna sampler
    pruner: Pruner = Pruner.median
    pruner_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna pruner
    prune_stage: str | None = None  # the pipeline stage from whose first validation on the pruner may stop a
    # trial (null: the last stage, the one the searched keys act on); earlier stages are logged, not reported
    n_trials: int | None = None  # null: the size of the grid (grid sampler only)
    seeds: int = 1  # seeds per configuration (a grid axis with the grid sampler, else run within each trial)
    metric: list[str] = field(default_factory=lambda: ["JF"])  # val/<metric> or a trial measure; two or
    # more: a multi-objective study (Pareto front); a single name may be written without the list
    direction: list[Direction] = field(default_factory=lambda: [Direction.maximize])  # one per metric
    storage: str | None = None  # null: SQLite beside the study's outputs; an RDB URL; or a *.journal file
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats (RDB storage)
    grace_period: int = 120  # a running trial silent this long died: marked failed and re-queued once
    ablation: bool = False  # a grid scored on test per trial: the per-variant table and its bar chart
    baseline: str | None = None  # the choice that is the Sa2VA control, labelled so in the table
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    stats: StatsSpec = field(default_factory=StatsSpec)
    profile: str = DEFAULT_PROFILE  # set by --profile, named by the table
    profiles: dict[str, Any] = field(default_factory=dict)


SPEC_FIELDS = {f.name for cls in (SweepSpec, ParamSpec, ConfirmSpec, StatsSpec) for f in fields(cls)}
LISTED = ("metric", "direction")
"""Fields that take one value or a list of them (one metric, or several for a multi-objective study)."""


def load_spec(path: Path, profile: str = DEFAULT_PROFILE) -> SweepSpec:
    """Read, merge the profile, type-check and :func:`check_spec` a sweep spec (no model-stack import)."""
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} not found")
    raw = OmegaConf.load(path)
    profiles = raw.get("profiles") or {}
    if profile != DEFAULT_PROFILE:
        if profile not in profiles:
            known = ", ".join([DEFAULT_PROFILE, *profiles])
            raise SweepSpecError(f"sweep spec {path}: no profile '{profile}' (profiles: {known})")
        raw = OmegaConf.merge(raw, profiles[profile])
    if "name" not in raw:
        raw.name = path.stem if profile == DEFAULT_PROFILE else f"{path.stem}-{profile}"
    raw.profile = profile
    for key in LISTED:
        if key in raw and not OmegaConf.is_list(raw[key]):
            raw[key] = [raw[key]]
    try:
        spec: SweepSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), raw))
    except OmegaConfBaseException as error:
        message = str(error.msg).splitlines()[0]  # the lines after repeat the key and the dataclass
        hint = did_you_mean(str(error.key), SPEC_FIELDS) if error.key is not None else ""
        raise SweepSpecError(f"sweep spec {path}: field '{error.full_key}': {message}{hint}") from error
    check_spec(spec, path)
    return spec


def check_spec(spec: SweepSpec, path: Path) -> None:
    """What the field types cannot check: ranges, choices, the sampler's and the metrics' needs."""

    def fail(key: str, message: str) -> None:
        raise SweepSpecError(f"sweep spec {path}: field '{key}': {message}")

    if not spec.space:
        fail("space", "no parameter to search")
    for name, param in spec.space.items():
        check_param(spec, f"space.{name}", param, fail)
    if spec.sampler is Sampler.cmaes:
        if importlib.util.find_spec("cmaes") is None:
            fail("sampler", "cmaes needs the cmaes package (pip install cmaes)")
        categorical = [name for name, p in spec.space.items() if p.type is ParamType.categorical]
        if categorical:
            fail(f"space.{categorical[0]}.type", "CMA-ES searches numbers: use tpe or random for categories")
    if spec.n_trials is None and spec.sampler is not Sampler.grid:
        fail("n_trials", f"the {spec.sampler.value} sampler needs a number of trials")
    if spec.n_trials is not None and spec.n_trials < 1:
        fail("n_trials", f"must be at least 1, got {spec.n_trials}")
    if spec.seeds < 1:
        fail("seeds", f"must be at least 1, got {spec.seeds}")
    if spec.pruner is Pruner.threshold and not {"lower", "upper"} & set(spec.pruner_options):
        fail("pruner_options", "the threshold pruner needs lower or upper")
    if spec.baseline is not None and not any(spec.baseline in (p.choices or []) for p in spec.space.values()):
        fail("baseline", f"'{spec.baseline}' is not a choice of any parameter")
    if spec.ablation and spec.sampler is not Sampler.grid:
        fail(
            "ablation",
            f"an ablation compares every variant on test: it needs the grid sampler, not "
            f"{spec.sampler.value} (a search chooses on val and confirms on test: confirm.top)",
        )
    if spec.heartbeat_interval < 1 or spec.grace_period <= spec.heartbeat_interval:
        fail("grace_period", "must exceed heartbeat_interval (both in seconds, >= 1)")
    check_objectives(spec, fail)
    if spec.confirm.top < 0 or (spec.confirm.seeds is not None and spec.confirm.seeds < 1):
        fail("confirm", "top must be >= 0 and seeds >= 1 (or null: the study's seeds)")
    if not 0 < spec.stats.confidence < 1 or spec.stats.resamples < 1:
        fail("stats", "confidence must be in (0, 1) and resamples >= 1")


def check_param(spec: SweepSpec, key: str, param: ParamSpec, fail: Callable[[str, str], None]) -> None:
    if param.type is ParamType.categorical:
        if not param.choices:
            fail(f"{key}.choices", "a categorical parameter needs a non-empty list of choices")
        for choice in param.bundles:
            if choice not in param.choices:
                fail(f"{key}.bundles.{choice}", f"'{choice}' is not one of the choices {param.choices}")
        return
    if param.low is None or param.high is None:
        fail(f"{key}.low" if param.low is None else f"{key}.high", f"a {param.type.value} needs low and high")
    if param.low >= param.high:
        fail(f"{key}.high", f"high ({param.high}) must be above low ({param.low})")
    if param.type is ParamType.log_float and param.low <= 0:
        fail(f"{key}.low", f"a log_float needs low > 0, got {param.low}")
    if spec.sampler is Sampler.grid and param.type is not ParamType.int:
        fail(f"{key}.type", "the grid sampler takes categorical and int parameters")


def check_objectives(spec: SweepSpec, fail: Callable[[str, str], None]) -> None:
    """Every metric a name the stages log (or a trial measure), one direction each; pruning needs a single
    validation metric, as Optuna prunes only single-objective studies."""
    if not spec.metric:
        fail("metric", "name at least one metric")
    for index, name in enumerate(spec.metric):
        problem = unknown_metric(name)
        if problem:
            fail(f"metric[{index}]" if len(spec.metric) > 1 else "metric", problem)
    if len(spec.direction) != len(spec.metric):
        fail(
            "direction", f"one direction per metric: {len(spec.metric)} metrics, {len(spec.direction)} given"
        )
    if spec.pruner is not Pruner.none and len(spec.metric) > 1:
        fail("pruner", "Optuna prunes single-objective studies only: pruner: none for several metrics")
    if spec.pruner is not Pruner.none and spec.metric[0] in TRIAL_MEASURES:
        fail("pruner", f"{spec.metric[0]} is measured at a trial's end: nothing to prune on (pruner: none)")
    if spec.sampler is Sampler.cmaes and len(spec.metric) > 1:
        fail("sampler", "CMA-ES optimises one metric: use tpe or random for several")


def multi_objective(spec: SweepSpec) -> bool:
    return len(spec.metric) > 1


def study_dir(output_dir: Path, spec: SweepSpec) -> Path:
    """Where a study keeps its storage, plots and tables: ``<paths.output_dir>/sweeps/<study>/``."""
    return (output_dir / "sweeps" / spec.name).resolve()


def storage_url(spec: SweepSpec, folder: Path) -> str:
    return spec.storage or f"sqlite:///{folder / STORAGE_FILE}"


def one_line(error: Exception) -> str:
    """An error's message on one line (Hydra's end with advice on lines of their own)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def grid_values(spec: SweepSpec) -> dict[str, list[Any]]:
    """The values of every grid axis, seeds included (grid sampler)."""
    grid: dict[str, list[Any]] = {}
    for name, param in spec.space.items():
        if param.type is ParamType.categorical:
            grid[name] = list(param.choices or [])
        else:
            grid[name] = list(range(int(param.low), int(param.high) + 1, int(param.step or 1)))
    if spec.seeds > 1:
        grid[SEED_PARAM] = list(range(spec.seeds))
    return grid


def number_of_trials(spec: SweepSpec) -> int:
    if spec.n_trials is not None:
        return spec.n_trials
    return len(list(itertools.product(*grid_values(spec).values())))


def trial_seeds(spec: SweepSpec) -> list[int | None]:
    """The seeds each trial trains: one run per seed within the trial, unless seeds are a grid axis."""
    if spec.sampler is Sampler.grid or spec.seeds == 1:
        return [None]
    return list(range(spec.seeds))


def confirm_seeds(spec: SweepSpec) -> list[int | None]:
    """The seeds a confirmation run trains: ``confirm.seeds`` (default: the study's) seeds; one is the
    config's own seed, as a one-seed trial trains."""
    count = spec.confirm.seeds or spec.seeds
    return [None] if count == 1 else list(range(count))


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def short_value(value: Any) -> str:
    """A value as run names show it: floats to 4 significant digits (the exact value is a param)."""
    return f"{value:.4g}" if isinstance(value, float) else hydra_value(value)


def param_overrides(spec: SweepSpec, values: dict[str, Any]) -> list[str]:
    """The Hydra overrides that sampled ``values`` stand for."""
    overrides = []
    for name, value in values.items():
        bundles = spec.space[name].bundles if name in spec.space else {}
        if isinstance(value, str) and value in bundles:
            overrides += list(bundles[value])
        else:
            overrides.append(f"{name}={hydra_value(value)}")
    return overrides


def merge_overrides(*groups: list[str]) -> list[str]:
    """Overrides in order, a later one of the same key replacing an earlier one (Hydra takes one each); keys
    are read by Hydra's own override parser (``+key=``, ``group@package=``, quoting)."""
    parser = OverridesParser.create()
    merged: dict[str, str] = {}
    for group in groups:
        for override in parser.parse_overrides(list(group)):
            key = override.key_or_group + (f"@{override.package}" if override.package else "")
            merged.pop(key, None)
            merged[key] = override.input_line
    return list(merged.values())


def base_overrides(spec: SweepSpec, cli_overrides: list[str]) -> list[str]:
    """Every trial's overrides before its sampled values: the experiment, the spec's, the command line's."""
    return merge_overrides([f"experiment={spec.experiment}"], spec.overrides, cli_overrides)


def describe(values: dict[str, Any]) -> str:
    """A run name that says what varies: ``decoupler=orthogonal seed=1``, ``loss.w_orth=0.006939``."""
    return PARAM_SEPARATOR.join(f"{name}={short_value(value)}" for name, value in values.items())


def candidate_overrides(spec: SweepSpec) -> dict[str, list[str]]:
    """Overrides a trial may use, by the spec field that brings them, to compose before any trial starts."""
    candidates: dict[str, list[str]] = {}
    for name, param in spec.space.items():
        if param.type is ParamType.categorical:
            for index, choice in enumerate(param.choices or []):
                candidates[f"space.{name}.choices[{index}]"] = param_overrides(spec, {name: choice})
        else:
            low = int(param.low) if param.type is ParamType.int else param.low
            candidates[f"space.{name}"] = param_overrides(spec, {name: low})
    return candidates
