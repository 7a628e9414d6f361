"""Optuna's plots of a study as PNGs for its parent run, labelled for people: each trial by what it varied
(``decoupler=orthogonal seed=1``, not ``Trial3``) and each title with the split its values come from (the
study chooses on validation; an ablation's table is on test). Several metrics add the Pareto front."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from optuna.visualization import matplotlib as optuna_plots

from lightning_desa2va.files import atomic_write
from lightning_desa2va.tuning.metric_names import TRIAL_MEASURES
from lightning_desa2va.tuning.objective import NAME_ATTR
from lightning_desa2va.tuning.spec import SweepSpec

log = logging.getLogger(__name__)

TRIAL_LABEL = re.compile(r"^Trial(\d+)$")
TICK_FONT_SIZE = 6


def target_name(metric: str) -> str:
    return metric if metric in TRIAL_MEASURES else f"val/{metric}"


def plots(spec: SweepSpec) -> dict[str, Callable[[optuna.Study], Any]]:
    """Optuna's plots to draw, by file name (one objective; the first one and the Pareto front for more)."""
    name = target_name(spec.metric[0])
    first = {"target": (lambda trial: trial.values[0]), "target_name": name} if len(spec.metric) > 1 else {}
    chosen = {
        "optimization_history": lambda study: optuna_plots.plot_optimization_history(study, **first),
        "param_importances": lambda study: optuna_plots.plot_param_importances(study, **first),
        "parallel_coordinate": lambda study: optuna_plots.plot_parallel_coordinate(study, **first),
    }
    if len(spec.metric) > 1:
        names = [target_name(metric) for metric in spec.metric]
        chosen["pareto_front"] = lambda study: optuna_plots.plot_pareto_front(study, target_names=names)
    else:
        chosen["intermediate_values"] = optuna_plots.plot_intermediate_values
    return chosen


def label_trials(axes: Any, names: dict[int, str]) -> None:
    """Legend entries ``TrialN`` become the trial's name; an x axis of trial numbers names them too."""
    handles, labels = axes.get_legend_handles_labels()
    if any(TRIAL_LABEL.match(label) for label in labels):
        renamed = [
            names.get(int(m.group(1)), label) if (m := TRIAL_LABEL.match(label)) else label
            for label in labels
        ]
        axes.legend(handles, renamed, fontsize=TICK_FONT_SIZE, loc="best")
    if axes.get_xlabel() == "Trial" and names:
        numbers = sorted(names)
        axes.set_xticks(numbers, [names[number] for number in numbers], rotation=90, fontsize=TICK_FONT_SIZE)


def save_plots(study: optuna.Study, spec: SweepSpec, folder: Path) -> list[Path]:
    """The plots as PNGs; a plot the study cannot draw yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = {
        trial.number: str(trial.user_attrs.get(NAME_ATTR, trial.number))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    }
    split = ", ".join(target_name(metric) for metric in spec.metric)
    paths = []
    for name, plot in plots(spec).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log.info("no %s plot: %s", name, error)
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        label_trials(first, names)
        first.figure.suptitle(f"{spec.name}: chosen on validation ({split})", fontsize=9)
        path = folder / f"{name}.png"
        atomic_write(
            path, lambda tmp, f=first.figure: f.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
        )
        pyplot.close(first.figure)
        paths.append(path)
    return paths
