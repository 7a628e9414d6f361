"""The callbacks a sweep adds to a stage, on a real stage-2 fit: the pruning report fails the trial on a
metric the stage does not log (it once skipped it silently), reports to the trial only from the stage the
search acts on, and the test split's per-expression scores are kept in the order the J&F metric saw them."""

from __future__ import annotations

import optuna
import pytest
from torch.utils.data import DataLoader

from lightning_desa2va.tuning.callbacks import (
    ExpressionScoreRecorder,
    MissingMetricError,
    StepPruningCallback,
)
from lightning_desa2va.tuning.stats import ExpressionScores

EXPRESSIONS = ["the red circle", "the blue square moving left"]
TYPES = ["static", "motion"]
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


@pytest.fixture(scope="module")
def stage_and_batch(make_model, make_batch, build_stage):
    cfg, model = make_model("stage=decoupled_finetune", "stage.num_overlays=0")
    batch = make_batch(model, EXPRESSIONS, num_frames=2)
    batch["expression_type"] = list(TYPES)
    return build_stage(cfg, model), batch


def test_a_metric_the_stage_does_not_log_fails_the_trial_at_its_first_validation(
    stage_and_batch, fit_on_batch, tmp_path
):
    stage, batch = stage_and_batch
    trial = optuna.create_study().ask()
    callback = StepPruningCallback(trial, "val/JFF", 0, lambda step, value: None, True)
    with pytest.raises(MissingMetricError, match=r"logged no val/JFF \(it logged .*val/JF,"):
        fit_on_batch(stage, batch, 1, tmp_path, val_batch=batch, callbacks=[callback])


def test_a_stage_before_the_searched_one_is_logged_but_not_reported(stage_and_batch, fit_on_batch, tmp_path):
    stage, batch = stage_and_batch
    study = optuna.create_study(direction="maximize")
    logged: list[tuple[int, float]] = []
    callback = StepPruningCallback(
        study.ask(), "val/JF", 100, lambda step, value: logged.append((step, value)), False
    )
    fit_on_batch(stage, batch, 1, tmp_path, val_batch=batch, callbacks=[callback])
    assert [step for step, _ in logged] == [101]  # the trial's step: its earlier stages' 100, then 1
    assert study.trials[0].intermediate_values == {}


def test_the_test_splits_scores_are_kept_per_expression(stage_and_batch, fit_on_batch, tmp_path):
    stage, batch = stage_and_batch
    recorder = ExpressionScoreRecorder()
    trainer, _ = fit_on_batch(stage, batch, 1, tmp_path, callbacks=[recorder])
    trainer.test(stage, DataLoader([batch], batch_size=None), verbose=False)
    scores = recorder.scores
    assert scores.ids == [f"video-{index}/{text}" for index, text in enumerate(EXPRESSIONS)]
    assert scores.types == TYPES
    assert float(scores.jf.mean()) == pytest.approx(float(trainer.callback_metrics["test/JF"]), abs=1e-6)
    saved = ExpressionScores.read_csv(
        tmp_path / "expression_scores" / "test.csv"
    )  # no MLflow: the run folder
    assert saved.ids == scores.ids and saved.j == pytest.approx(scores.j)
