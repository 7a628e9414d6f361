"""Every rank agrees on the scores, also a rank that saw no sample: the metrics sync over a gloo group of two
processes (what DDP starts on CPUs) where rank 1 scored nothing, and the test split's per-expression table,
each rank holding its share of the expressions, ends up as one file written by rank 0. One group runs both
(starting a process costs more than the collectives)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distributed_runs import on_two_ranks

from lightning_desa2va.metrics import JFMetric, PerTypeMean, synced

TYPES = ["static", "motion"]
QA_HITS = [1.0, 0.0]
SCORES = "scores-rank{rank}.json"


def clips() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two clips' predicted and true masks [2, T, H, W], one expression type each."""
    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.rand(2, 3, 16, 16, generator=generator) > 0.5 for _ in range(2))
    return pred, target, TYPES


def score_and_record(rank: int, folder: Path) -> None:
    """Rank 0 alone scores both clips, then each rank records one clip's expression for the table."""
    from lightning_desa2va.tuning.callbacks import ExpressionScoreRecorder

    jf, qa = JFMetric(), PerTypeMean("qa_accuracy")
    if rank == 0:
        jf.update(*clips())
        qa.update(torch.tensor(QA_HITS, dtype=torch.float64), TYPES)
    (folder / SCORES.format(rank=rank)).write_text(json.dumps({**synced(jf), **synced(qa)}))

    pred, target, types = clips()
    jf = JFMetric()
    jf.update(pred[rank : rank + 1], target[rank : rank + 1], types[rank : rank + 1])
    recorder = ExpressionScoreRecorder()
    recorder.ids = [f"video-{rank}/the shape"]
    trainer = SimpleNamespace(
        global_rank=rank, is_global_zero=rank == 0, logger=None, default_root_dir=folder
    )
    recorder.on_test_epoch_end(trainer, SimpleNamespace(scores={"test": {"jf": jf}}))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ranks")
    on_two_ranks(score_and_record, folder)
    return folder


def scores_alone() -> dict[str, float]:
    alone = JFMetric()
    alone.update(*clips())
    return alone.compute()


def test_a_rank_that_saw_no_sample_computes_the_scores_of_the_rank_that_did(two_ranks) -> None:
    expected = {**scores_alone(), "qa_accuracy": sum(QA_HITS) / len(QA_HITS)}
    for rank in range(2):
        scores = json.loads((two_ranks / SCORES.format(rank=rank)).read_text())
        assert {name: scores[name] for name in expected} == pytest.approx(expected), rank
        assert "JF/static" in scores and "JF/motion" in scores


def test_the_ranks_per_expression_scores_end_up_in_one_file(two_ranks) -> None:
    from lightning_desa2va.tuning.mlflow_runs import EXPRESSIONS_ARTIFACT_DIR
    from lightning_desa2va.tuning.stats import ExpressionScores

    files = list((two_ranks / EXPRESSIONS_ARTIFACT_DIR).iterdir())
    assert [path.name for path in files] == ["test.csv"]
    table = ExpressionScores.read_csv(files[0])
    assert table.ids == ["video-0/the shape", "video-1/the shape"] and table.types == TYPES
    assert sum(table.jf) / len(table.jf) == pytest.approx(scores_alone()["JF"])
