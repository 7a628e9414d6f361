"""Interrupted training loses nothing: a stage killed (SIGKILL) between checkpoints and continued with
``resume=auto`` ends exactly as an uninterrupted run (the same losses step by step, the same val J&F) in the
same folder and MLflow run, no step logged twice; so does one stopped by SIGTERM in a validation, and one
that Lightning's own check stops at an epoch's end ends with the same scores (a killed demo:
tests/test_resume_demo.py)."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from interruptions import (
    TINY_STAGE,
    StopAt,
    TermAtEpochEnd,
    TermInValidation,
    desa2va,
    die_at_step,
    metric_steps,
    stopped_by,
)
from mlflow.tracking import MlflowClient

from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.runs import FINISHED, INTERRUPTED, RUNNING, read_record
from lightning_desa2va.training import StageRun, train_stage

pytestmark = pytest.mark.long(seconds=13)


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder) -> tuple[Path, list[str], Any]:
    """The tiny stage run without interruption: its scratch folder, overrides and run."""
    root = tmp_path_factory.mktemp("resume")
    with in_scratch_folder(root) as store:
        overrides = [*TINY_STAGE, store]
        cfg = compose_config(overrides)
        ensure_synthetic_shards(cfg)
        return root, overrides, train_stage(cfg)


def the_same_run(root: Path, store: str, run_dir: Path, uninterrupted: StageRun) -> None:
    """``run_dir`` finished as ``uninterrupted`` did: the same scores and the same metrics step by step, each
    step logged once, in one MLflow run."""
    record = read_record(run_dir)
    assert record.status == FINISHED
    assert record.results["val"] == uninterrupted.metrics  # val J&F and every other score, exactly
    client = MlflowClient(tracking_uri=store.split("=", 1)[1])
    assert client.get_run(record.mlflow_run_id).info.status == "FINISHED"
    losses = metric_steps(client, record.mlflow_run_id, "train/loss")
    assert [step for step, _ in losses] == list(range(10))  # steps trained twice are logged once
    assert losses == metric_steps(client, uninterrupted.run_id, "train/loss")
    validations = metric_steps(client, record.mlflow_run_id, "val/JF")
    assert len(validations) == 2  # neither skipped nor repeated
    assert validations == metric_steps(client, uninterrupted.run_id, "val/JF")


def test_a_stage_killed_between_checkpoints_resumes_to_the_uninterrupted_result(uninterrupted) -> None:
    root, overrides, reference = uninterrupted
    runs = root / "outputs" / "default" / "text_pretrain"
    before = set(runs.iterdir())
    assert die_at_step(root, "train", "text_pretrain", 7, overrides) == -signal.SIGKILL
    (killed,) = set(runs.iterdir()) - before
    assert read_record(killed).status == RUNNING  # nothing ended it
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    result = desa2va(root, "train", *overrides, "resume=auto")

    assert result.returncode == 0, result.stderr[-3000:]
    assert set(runs.iterdir()) == before | {killed}  # continued, not started anew
    the_same_run(root, overrides[-1], killed, reference)


def stopped_at_step_5(root: Path, stopper: StopAt, overrides: list[str]) -> Path:
    """Stop the stage with ``stopper``; the ``last.ckpt`` it said it saved, checked to hold step 5."""
    stopped = stopped_by(root, stopper, overrides)
    last = stopped.stderr.strip().splitlines()[-1]
    match = re.search(r"RunInterrupted: SIGTERM: stopped at step 5, saved (\S+)", last)
    assert match, stopped.stderr[-3000:]
    checkpoint = Path(match[1])
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 5
    assert read_record(checkpoint.parent.parent).status == INTERRUPTED
    return checkpoint


def test_a_stage_stopped_during_a_validation_validates_again_when_resumed(uninterrupted) -> None:
    root, overrides, reference = uninterrupted
    checkpoint = stopped_at_step_5(root, TermInValidation(5), overrides)

    result = desa2va(root, "train", *overrides, f"resume_from={checkpoint}")

    assert result.returncode == 0, result.stderr[-3000:]
    the_same_run(root, overrides[-1], checkpoint.parent.parent, reference)


def test_a_sigterm_lightning_sees_first_stops_the_stage_as_any_other(uninterrupted) -> None:
    """At an epoch's end, after the checkpoint callback's last look at the epoch, Lightning's own stop
    (``SIGTERMException``, a ``SystemExit`` of status 0) stops the run as the project's does: saved at its
    step, interrupted; resumed, it ends with the uninterrupted run's scores."""
    root, overrides, reference = uninterrupted
    checkpoint = stopped_at_step_5(root, TermAtEpochEnd(5), overrides)

    result = desa2va(root, "train", *overrides, f"resume_from={checkpoint}")

    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(checkpoint.parent.parent)
    assert record.status == FINISHED and record.results["val"] == reference.metrics
