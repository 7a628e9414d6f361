"""Two processes (``strategy=ddp trainer.devices=2``, gloo on the CPU) train the tiny default's two stages
and the Sa2VA control as one process would: they finish, rank 0 alone leaves a run folder and an MLflow run
per stage, the validation scores are a single process's on the same checkpoint, and the ranks read
different training shards, every shard between them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_runs import (
    EXPERIMENTS_DIR,
    PIPELINES,
    STAGES,
    TINY,
    TWO_PROCESSES,
    run_job,
    shard_of_videos,
    trained_videos,
)
from mlflow.tracking import MlflowClient

from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import evaluate_checkpoint
from lightning_desa2va.runs import read_record

pytestmark = pytest.mark.long(seconds=27)  # two processes

SCORE_TOLERANCE = 1e-5
"""J&F of two processes against one: the same masks, scored in a different batching."""
RUNS = [(experiment, stage) for experiment, stages in STAGES.items() for stage in stages]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder) -> tuple[Path, str]:
    """Both pipelines run once by two processes: their scratch folder and MLflow store."""
    root = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    with in_scratch_folder(root) as store:
        job = run_job(root, [*TINY, store, *TWO_PROCESSES])
    torch.set_num_threads(threads)
    assert job.returncode == 0, job.stderr[-3000:]
    return root, store


def the_run(root: Path, experiment: str, stage: str) -> Path:
    (run_dir,) = (root / "outputs" / experiment / stage).iterdir()  # exactly one run folder
    return run_dir


def test_two_processes_leave_one_run_folder_and_one_mlflow_run_per_stage(two_processes) -> None:
    root, store = two_processes
    client = MlflowClient(tracking_uri=store.split("=", 1)[1])
    experiments = [found.experiment_id for found in client.search_experiments()]
    assert len(client.search_runs(experiments)) == len(RUNS)
    for experiment, stage in RUNS:
        assert len(list((root / "outputs" / experiment / "pipelines").iterdir())) == 1
        record = read_record(the_run(root, experiment, stage))
        assert client.get_run(record.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("experiment", "stage"), RUNS)
def test_two_processes_score_validation_as_one_process_scores_their_checkpoint(
    experiment, stage, two_processes, in_scratch_folder
) -> None:
    root, store = two_processes
    record = read_record(the_run(root, experiment, stage))
    threads = torch.get_num_threads()
    with in_scratch_folder(root):
        cfg = compose_config([f"stage={stage}", *PIPELINES[experiment], *TINY, store], EXPERIMENTS_DIR)
        alone, _ = evaluate_checkpoint(cfg, Path(record.checkpoint), "val")
    torch.set_num_threads(threads)
    assert record.results["val"]["JF"] == pytest.approx(alone["JF"], abs=SCORE_TOLERANCE)


@pytest.mark.parametrize(("experiment", "stage"), RUNS)
def test_each_training_shard_is_read_by_one_of_two_ranks(experiment, stage, two_processes) -> None:
    root, _ = two_processes
    shard = shard_of_videos(root / "data" / "shapes")
    read = {
        rank: {shard[video] for video in videos}
        for rank, videos in trained_videos(root, experiment, stage).items()
    }
    assert read.keys() == {0, 1} and not read[0] & read[1], read
    assert read[0] | read[1] == set(shard.values())
