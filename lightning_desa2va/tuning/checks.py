"""What a sweep checks by composing configs before any trial trains (after the spec's own checks, which need
no model stack): every choice composes, the metric is one the pipeline's last stage logs, ``prune_stage`` is
one of its stages, an ablation's arms train the same total steps, a trial trains on one device, and a study
shared through a database server logs to a tracking server. Errors name the spec field, with "did you mean"
for a near-miss config key or variant."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_desa2va.config import ConfigError, compose_config, config_groups
from lightning_desa2va.tuning.metric_names import did_you_mean, unknown_metric
from lightning_desa2va.tuning.spec import (
    SweepSpec,
    SweepSpecError,
    candidate_overrides,
    merge_overrides,
    one_line,
)

BASE_FIELD = "experiment / overrides"
REMOTE_DATABASES = ("postgresql", "mysql", "mariadb", "oracle", "mssql")
TRACKING_SERVERS = ("http://", "https://", "databricks")
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")
UNKNOWN_CHOICE = re.compile(r"Could not find '([^'/]+)/([^']+)'")


def check_trial_configs(spec: SweepSpec, overrides: list[str], experiments_dir: Path | None) -> DictConfig:
    """Compose the base config and each choice's, check what a trial reads from them; the base config."""
    base = compose(BASE_FIELD, [], overrides, experiments_dir, None)
    budgets: dict[str, dict[str, int]] = {}
    for field_name, extra in {BASE_FIELD: [], **candidate_overrides(spec)}.items():
        merged = merge_overrides(overrides, extra)
        cfg = compose(field_name, extra, merged, experiments_dir, base) if extra else base
        stages = list(cfg.pipeline.stages)
        arm = f"sweep spec field '{{key}}' ({field_name}{': ' if extra else ''}{' '.join(extra)})"
        for metric in spec.metric:
            problem = unknown_metric(metric, stages[-1])
            if problem:
                raise SweepSpecError(f"{arm.format(key='metric')}: {problem}")
        check_one_device(arm, cfg)
        if spec.prune_stage is not None and spec.prune_stage not in stages:
            message = f"'{spec.prune_stage}' is not a stage of the pipeline {stages}"
            raise SweepSpecError(f"{arm.format(key='prune_stage')}: {message}")
        if spec.ablation:
            budgets[" ".join(extra) or "the base"] = {
                stage: int(
                    compose(
                        field_name, extra, [f"stage={stage}", *merged], experiments_dir, base
                    ).trainer.max_steps
                )
                for stage in stages
            }
    check_equal_budgets(budgets)
    return base


def check_one_device(arm: str, cfg: DictConfig) -> None:
    """A trial trains on one device: a distributed launch would start the whole sweep once per process.
    Several devices serve a sweep as workers instead (``--workers N``: one device each)."""
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if (isinstance(devices, int) and devices > 1) or isinstance(devices, list | ListConfig) or nodes > 1:
        raise SweepSpecError(
            f"{arm.format(key='overrides')}: a trial trains on one device (trainer.devices={devices}, "
            f"trainer.num_nodes={nodes}); `desa2va sweep SPEC --workers N` trains N trials at once, one "
            "device each"
        )


def check_shared_tracking(storage: str | None, tracking_uri: str) -> None:
    """A study in a database server is shared by workers on several machines: their runs must go to one
    tracking server, or each machine's would stay in its own local store (and the parent run id kept in the
    study would name a run the others cannot see)."""
    remote_storage = storage is not None and storage.split(":", 1)[0].split("+")[0] in REMOTE_DATABASES
    if remote_storage and not tracking_uri.startswith(TRACKING_SERVERS):
        raise SweepSpecError(
            f"sweep spec field 'storage' ({storage.split('@')[-1]}) is a database server, but runs would be "
            f"logged to {tracking_uri}, a store on this machine: set MLFLOW_TRACKING_URI (or "
            "logger.tracking_uri) to the team's MLflow server, e.g. http://127.0.0.1:5001 (desa2va services)"
        )


def check_equal_budgets(budgets: dict[str, dict[str, int]]) -> None:
    """An ablation compares its arms at one training budget: refuse arms whose stages sum differently."""
    groups: dict[int, list[str]] = {}
    for arm, steps in budgets.items():
        groups.setdefault(sum(steps.values()), []).append(arm)
    if len(groups) <= 1:
        return
    listed = "; ".join(
        f"{total} ({' + '.join(f'{stage} {n}' for stage, n in budgets[arms[0]].items())}): {', '.join(arms)}"
        for total, arms in groups.items()
    )
    raise SweepSpecError(
        f"sweep spec field 'space': the arms of this ablation train different total steps: {listed}; set "
        "each stage's steps with pipeline.steps.<stage>=N (the Sa2VA control takes their sum), not "
        "trainer.max_steps, which sets every stage alike"
    )


def compose(
    field_name: str,
    shown: list[str],
    overrides: list[str],
    experiments_dir: Path | None,
    base: DictConfig | None,
) -> DictConfig:
    """The config of ``overrides``; an error names the spec field and the overrides it brings (``shown``)."""
    try:
        return compose_config(overrides, experiments_dir)
    except (HydraException, ConfigError) as error:
        message = one_line(error)
        raise SweepSpecError(
            f"sweep spec field '{field_name}' ({' '.join(shown)}): {message}{suggestion(message, base)}"
        ) from error


def suggestion(message: str, base: DictConfig | None) -> str:
    """Did you mean the config key or the variant closest to the one Hydra could not find?"""
    choice = UNKNOWN_CHOICE.search(message)
    if choice:
        return did_you_mean(choice.group(2), config_groups().get(choice.group(1), []))
    key = UNKNOWN_KEY.search(message)
    if key and base is not None:
        return did_you_mean(
            key.group(1).lstrip("+~"), config_keys(OmegaConf.to_container(base, resolve=False))
        )
    return ""


def config_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a config container."""
    if not isinstance(node, dict):
        return {prefix} if prefix else set()
    keys = {prefix} if prefix else set()
    for key, value in node.items():
        keys |= config_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return keys
