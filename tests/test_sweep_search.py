"""A search chooses on val and confirms on test: a TPE study over two stages, its trials scored on val only
and reported to the pruner from stage 2 (the stage its key acts on), its best configuration trained again and
scored on test; raising ``n_trials`` on the finished study and running it again goes on to the end."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sweep_runs import EXPERIMENTS, TINY, mlflow_runs, tracking_uri, write_spec

from lightning_desa2va.tuning.metric_names import STAGE_METRICS
from lightning_desa2va.tuning.spec import load_spec
from lightning_desa2va.tuning.sweep import run_sweep

pytestmark = pytest.mark.long(seconds=18)

W_ORTH = "loss.w_orth"
TWO_STAGES = [
    *(override for override in TINY if not override.startswith(("pipeline.stages", "trainer.max_steps"))),
    "pipeline.stages=[text_pretrain,decoupled_finetune]",
    "pipeline.steps={text_pretrain:2,decoupled_finetune:2}",
]
STAGE_2_VALIDATION = 4  # stage 1's 2 steps, then stage 2's validation at its step 2


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder):
    """One TPE trial, then the finished study raised to two (median pruner, no start-up trials)."""
    root = tmp_path_factory.mktemp("search")
    space = {W_ORTH: {"type": "log_float", "low": 0.001, "high": 1.0}}
    options = {"sampler": "tpe", "sampler_options": {"seed": 0}, "pruner": "median", "n_trials": 1}
    path = write_spec(
        root, "search", space, overrides=TWO_STAGES, pruner_options={"n_startup_trials": 0}, **options
    )
    with in_scratch_folder(root) as store:
        first = run_sweep(load_spec(path), [store], EXPERIMENTS)
        first_trials = first.study.get_trials()
        spec = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**spec, "n_trials": 2}))
        second = run_sweep(load_spec(path), [store], EXPERIMENTS)
    return root, first_trials, second


def test_no_trial_scores_test_and_the_confirmation_runs_do(search):
    root, _, result = search
    client = MlflowClient(tracking_uri(root))
    trials = mlflow_runs(root, "search", "trial")
    assert len(trials) == 2
    for run in trials:
        nested = [
            r for r in mlflow_runs(root, "search") if r.data.tags.get("mlflow.parentRunId") == run.info.run_id
        ]
        assert not [key for r in [run, *nested] for key in r.data.metrics if key.startswith("test/")]
    confirmations = mlflow_runs(root, "search", "confirm")
    best = max(result.study.get_trials(states=(TrialState.COMPLETE,)), key=lambda trial: trial.value)
    assert {run.data.tags["sweep.trial"] for run in confirmations} >= {str(best.number)}
    for run in confirmations:
        assert run.info.status == "FINISHED" and "test/JF" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "expression_scores")] == [
            "expression_scores/test-seed0.csv"
        ]
    (row,) = result.report.table.rows[:1]
    assert row[0].startswith(f"#{best.number} ") and float(row[3]) == pytest.approx(best.value, abs=5e-4)
    assert "val JF" in result.report.table.headers and "J&F 95% CI" in result.report.table.headers


def test_the_pruner_hears_only_the_stage_the_searched_key_acts_on(search):
    _, _, result = search
    for trial in result.study.get_trials():
        assert set(trial.intermediate_values) <= {STAGE_2_VALIDATION}


def test_raising_n_trials_on_a_finished_study_runs_it_to_the_end(search):
    root, first, result = search
    assert len(first) == 1 and all(trial.state.is_finished() for trial in first)
    trials = result.study.get_trials()
    assert len(trials) == 2 and all(trial.state.is_finished() for trial in trials)
    (parent,) = mlflow_runs(root, "search", "study")
    assert parent.info.status == "FINISHED" and parent.data.metrics[
        "trials_complete"
    ] + parent.data.metrics.get("trials_pruned", 0) == pytest.approx(2)
    best = max(result.study.get_trials(states=(TrialState.COMPLETE,)), key=lambda trial: trial.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best/JF"] == pytest.approx(best.value)
    assert "| #" in parent.data.tags["mlflow.note.content"]  # the confirmation table as its description
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(root, "search"))


def test_sampled_values_are_params_and_run_names_round_them(search):
    root, _, result = search
    for trial in result.study.get_trials():
        run = next(
            r for r in mlflow_runs(root, "search", "trial") if r.data.tags["sweep.trial"] == str(trial.number)
        )
        value = trial.params[W_ORTH]
        assert float(run.data.params[f"sweep/{W_ORTH}"]) == pytest.approx(value)
        assert run.info.run_name == f"{W_ORTH}={value:.4g}"


def test_every_metric_a_stage_logs_is_one_a_spec_may_name(search):
    root, _, _ = search
    for stage, names in STAGE_METRICS.items():
        run = next(r for r in mlflow_runs(root, "search") if r.info.run_name.endswith(f" {stage}"))
        logged = {key.removeprefix("val/") for key in run.data.metrics if key.startswith("val/")}
        logged = {key for key in logged if not key.startswith("union_baseline/")}
        assert logged <= names and {"JF", "J", "F", "cIoU", "gIoU", "mask_share/target"} <= logged
