"""Choose on val, confirm on test: a search (any study that is not an ablation) never scores the test split
per trial; at its end the best ``confirm.top`` configurations by validation (the Pareto front, first metric
first, for several metrics) are trained again with ``confirm.seeds`` seeds and scored on test, each a run
nested under the study's parent run (``sweep.role=confirm``). Results are kept in the study's user attributes
by trial and seed, so a confirmation interrupted or extended (more trials, a new best) resumes where it
stopped, and the table is recomputed from them without training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_desa2va.tuning.ablation import AblationReport, Variant, write_report
from lightning_desa2va.tuning.mlflow_runs import CONFIRM_ROLE, PARENT_RUN_ATTR, best_trials
from lightning_desa2va.tuning.objective import NAME_ATTR, Training, TrialObjective
from lightning_desa2va.tuning.spec import SweepSpec, confirm_seeds, merge_overrides, param_overrides

log = logging.getLogger(__name__)

CONFIRM_ATTR = "confirm:{number}"  # study user attribute: a trial's confirmation results by seed
CONFIRM_STEM = "confirmation"


def chosen(study: optuna.Study, spec: SweepSpec) -> list[FrozenTrial]:
    """The ``confirm.top`` best complete trials by validation (one metric), or the Pareto front's."""
    if len(spec.metric) > 1:
        return best_trials(study)[: spec.confirm.top]
    sign = 1 if spec.direction[0].value == "maximize" else -1
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda trial: -sign * trial.values[0])[: spec.confirm.top]


def confirm(study: optuna.Study, spec: SweepSpec, objective: TrialObjective) -> list[FrozenTrial]:
    """Train and score on test each chosen configuration's missing seeds; the trials confirmed."""
    trials = chosen(study, spec)
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    for trial in trials:
        key = CONFIRM_ATTR.format(number=trial.number)
        done: dict[str, Any] = dict(study.user_attrs.get(key, {}))
        for seed in confirm_seeds(spec):
            if str(seed) in done:
                continue
            name = f"{trial.user_attrs.get(NAME_ATTR, trial.number)} (confirm)"
            log.info("confirming trial %d on test (seed %s): %s", trial.number, seed, name)
            cfg = objective.last_stage_config(trial_overrides(objective, spec, trial))
            run_id = objective.runs.start_run(
                parent_id, CONFIRM_ROLE, trial.number, name, trial.params, cfg
            ).run_id
            training = Training()
            try:
                objective.train_seed(
                    trial_overrides(objective, spec, trial), seed, name, run_id, training, True
                )
            except BaseException:
                objective.runs.end_run(run_id, TrialState.FAIL, {})
                raise
            result = training.results[0]
            test = {f"test/{metric}": value for metric, value in result.test_metrics.items()}
            objective.runs.log_expressions(run_id, training.expressions)
            objective.runs.end_run(run_id, TrialState.COMPLETE, test, result.checkpoint)
            done[str(seed)] = {
                "test": result.test_metrics,
                "val": result.metrics,
                "expressions": training.expressions[0] if training.expressions else None,
                "steps": training.planned,
                "run_id": run_id,
            }
            study.set_user_attr(key, done)
    return trials


def trial_overrides(objective: TrialObjective, spec: SweepSpec, trial: FrozenTrial) -> list[str]:
    return merge_overrides(objective.overrides, param_overrides(spec, trial.params))


def confirmed_variants(study: optuna.Study, spec: SweepSpec) -> list[Variant]:
    """Each chosen configuration with its confirmation runs' test scores, ranked by validation."""
    variants = []
    for trial in chosen(study, spec):
        variant = Variant(f"#{trial.number} {trial.user_attrs.get(NAME_ATTR, '')}".strip())
        variant.val.append(float(trial.values[0]))
        results = study.user_attrs.get(CONFIRM_ATTR.format(number=trial.number), {})
        for index, (_, result) in enumerate(sorted(results.items())):
            variant.add_seed(index, result["test"], result["expressions"])
            variant.steps.append(int(result["steps"]))
        variants.append(variant)
    return variants


def confirmation_report(study: optuna.Study, spec: SweepSpec, folder: Path) -> AblationReport:
    """The confirmed configurations' table (val beside test) and chart (``confirmation.md`` / ``.png``)."""
    what = f"the top {spec.confirm.top} by val/{spec.metric[0]}, retrained and confirmed"
    return write_report(spec, confirmed_variants(study, spec), what, folder, CONFIRM_STEM)
