"""A study in one process: a trial that raises is failed and the next one runs; a pruned trial is pruned in
Optuna and shows so in MLflow; runs nest study > trial > stage and name what varies; a study where no trial
completed ends the command with an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sweep_runs import EXPERIMENTS, mlflow_runs, tracking_uri, write_spec

from lightning_desa2va.cli import main
from lightning_desa2va.tuning.spec import load_spec
from lightning_desa2va.tuning.sweep import run_sweep

pytestmark = pytest.mark.long(seconds=19)

LR = "stage.optimizer.lr"
HUGE = 1.0e30


@pytest.fixture(scope="module")
def failed_and_pruned(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder):
    """Two grid trials: an enormous learning rate (the loss is NaN by the second step) and one a threshold
    pruner stops at its first validation (J&F is never above 2)."""
    root = tmp_path_factory.mktemp("trials")
    space = {LR: {"type": "categorical", "choices": [3.0e-4, HUGE]}}
    spec = write_spec(root, "trials", space, pruner="threshold", pruner_options={"lower": 2.0})
    with in_scratch_folder(root) as store:
        result = run_sweep(load_spec(spec), [store], EXPERIMENTS)
    return root, result


def test_a_trial_that_raises_is_failed_and_the_study_goes_on(failed_and_pruned):
    root, result = failed_and_pruned
    trials = result.study.get_trials()
    assert [(trial.params[LR], trial.state) for trial in trials] == [
        (HUGE, TrialState.FAIL),
        (3.0e-4, TrialState.PRUNED),
    ]
    runs = {run.data.tags["sweep.trial"]: run for run in mlflow_runs(root, "trials", "trial")}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["sweep.state"] == "FAIL"


def test_a_pruned_trial_is_pruned_in_optuna_and_mlflow(failed_and_pruned):
    root, result = failed_and_pruned
    pruned = result.study.get_trials()[1]
    assert pruned.intermediate_values.keys() == {2}  # reported at the validation of step 2, then pruned
    run = {run.data.tags["sweep.trial"]: run for run in mlflow_runs(root, "trials", "trial")}["1"]
    assert run.info.status == "KILLED" and run.data.tags["sweep.state"] == "PRUNED"
    history = MlflowClient(tracking_uri(root)).get_metric_history(run.info.run_id, "val/JF")
    assert [(point.step, point.value) for point in history] == [(2, pruned.intermediate_values[2])]
    stages = [
        r for r in mlflow_runs(root, "trials") if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
    ]
    assert [stage.info.status for stage in stages] == ["KILLED"]


def test_runs_nest_study_trial_stage_and_are_named_by_what_varies(failed_and_pruned):
    root, result = failed_and_pruned
    (parent,) = mlflow_runs(root, "trials", "study")
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_fail"] == 1 and parent.data.metrics["trials_pruned"] == 1
    trials = mlflow_runs(root, "trials", "trial")
    assert {run.info.run_name for run in trials} == {f"{LR}=1e+30", f"{LR}=0.0003"}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(run.data.params[f"sweep/{LR}"]) == float(run.info.run_name.split("=")[1])
        assert run.data.params["loss/w_orth"] == "0.1"  # the flattened config
        assert run.data.tags["decoupler"] == "linear_ortho"  # the component's real variant
    stage = next(r for r in mlflow_runs(root, "trials") if r.info.run_name.endswith("decoupled_finetune"))
    assert stage.info.run_name == f"{LR}=0.0003 decoupled_finetune"
    assert (
        parent.data.tags["sweep.role"] == "study"
        and "Trials side by side" in parent.data.tags["mlflow.note.content"]
    )
    client = MlflowClient(tracking_uri(root))
    assert client.get_experiment_by_name("trials").tags["mlflow.experimentKind"] == "custom_model_development"
    assert Path(result.folder, "trials.csv").is_file()


def test_a_sweep_where_every_trial_failed_exits_with_an_error(tmp_path, in_scratch_folder):
    spec = write_spec(tmp_path, "all_failed", {LR: {"type": "categorical", "choices": [HUGE]}})
    with in_scratch_folder(tmp_path) as store, pytest.raises(SystemExit) as stop:
        main(["--experiments-dir", str(EXPERIMENTS), "sweep", str(spec), store])
    assert str(stop.value.code).startswith("desa2va: error: study all_failed: no trial completed (1 failed")
