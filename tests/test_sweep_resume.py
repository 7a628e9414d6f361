"""A sweep stopped with Ctrl-C (SIGINT) in the middle of a trial exits cleanly (the trial failed and
re-queued, the parent run closed, exit status 130); one killed outright (SIGKILL) leaves a trial that the next
start finds dead by its heartbeat. Started again after each, the study ends with exactly its number of
complete trials, none lost or run twice, and no trial or run left RUNNING, in Optuna and in MLflow; the retry
of the stopped trial continues its stage run from the checkpoint saved at the signal."""

from __future__ import annotations

import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from sweep_runs import LONGER_TRIALS, load_study, mlflow_runs, run_sweep_process, start_sweep, write_spec

from lightning_desa2va.runs import FINISHED, read_pipeline, read_record

pytestmark = pytest.mark.long(seconds=26)

POLL_S = 0.5
WAIT_S = 600
RUNNING_WITH_RUN = """
    SELECT 1 FROM trials JOIN trial_user_attributes USING (trial_id)
    WHERE trials.number = ? AND trials.state = 'RUNNING' AND trial_user_attributes.key = 'mlflow_run_id'
"""
SIGINT_EXIT = 128 + signal.SIGINT


def trial_started(storage: Path, number: int) -> bool:
    """Whether the trial runs and has its MLflow run (read from the SQLite file: quick enough to poll)."""
    if not storage.exists():
        return False
    with closing(sqlite3.connect(storage, timeout=POLL_S)) as connection:
        try:
            return connection.execute(RUNNING_WITH_RUN, (number,)).fetchone() is not None
        except sqlite3.OperationalError:  # tables not created yet, or locked by a write
            return False


def stage_run_started(root: Path, number: int) -> bool:
    """Whether trial ``number``'s pipeline has started its stage run (its folder holds a run record)."""
    pipeline = root / f"outputs/sweeps/resume/trials/{number:05d}/seed-None"
    if not (pipeline / "pipeline.json").is_file():
        return False
    run_dir = read_pipeline(pipeline).stages.get("decoupled_finetune")
    return run_dir is not None and (Path(run_dir) / "run.json").is_file()


def stop_in_trial(root: Path, spec: Path, number: int, signum: int, in_stage: bool = False) -> int:
    """Start the sweep, send ``signum`` in the middle of trial ``number`` (``in_stage``: once its stage run
    has started); its exit status."""
    process = start_sweep(root, spec)
    storage = root / "outputs/sweeps/resume/optuna.db"
    deadline = time.monotonic() + WAIT_S
    while not (stage_run_started(root, number) if in_stage else trial_started(storage, number)):
        assert process.poll() is None, "the sweep ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    time.sleep(POLL_S)
    process.send_signal(signum)
    return process.wait(timeout=WAIT_S)


def test_a_sweep_interrupted_or_killed_mid_trial_resumes_to_exactly_its_trials(tmp_path):
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal"]}}
    spec = write_spec(tmp_path, "resume", space, overrides=LONGER_TRIALS)

    assert stop_in_trial(tmp_path, spec, 0, signal.SIGINT, in_stage=True) == SIGINT_EXIT
    stage_run = Path(
        read_pipeline(tmp_path / "outputs/sweeps/resume/trials/00000/seed-None").stages["decoupled_finetune"]
    )
    checkpoint = stage_run / "checkpoints" / "last.ckpt"
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"] if checkpoint.is_file() else 0
    assert [t.state for t in load_study(tmp_path, "resume").get_trials()] == [
        TrialState.FAIL,
        TrialState.WAITING,
    ]
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(tmp_path, "resume"))
    (parent,) = mlflow_runs(tmp_path, "resume", "study")
    assert parent.info.status == "KILLED"
    stopped = (tmp_path / "sweep.log").read_text().strip().splitlines()[-1]
    assert "SIGINT" in stopped and "its running trial failed and re-queued" in stopped

    stop_in_trial(tmp_path, spec, 2, signal.SIGKILL)  # after the retry of trial 0 completed
    run_sweep_process(tmp_path, spec)

    trials = load_study(tmp_path, "resume").get_trials()
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE] * 2
    assert [trials[1].system_attrs["failed_trial"], trials[3].system_attrs["failed_trial"]] == [0, 2]
    assert trials[1].params == trials[0].params and trials[3].params == trials[2].params
    assert sorted(trial.params["decoupler"] for trial in trials if trial.state == TrialState.COMPLETE) == [
        "linear",
        "orthogonal",
    ]

    runs = {int(run.data.tags["sweep.trial"]): run for run in mlflow_runs(tmp_path, "resume", "trial")}
    assert {number: (run.info.status, run.data.tags["sweep.state"]) for number, run in runs.items()} == {
        0: ("FAILED", "FAIL"),
        1: ("FINISHED", "COMPLETE"),
        2: ("FAILED", "FAIL"),
        3: ("FINISHED", "COMPLETE"),
    }
    assert all(runs[n].info.run_id == trials[n].user_attrs["mlflow_run_id"] for n in runs)
    record = read_record(stage_run)  # trial 1, the retry of trial 0, continued trial 0's stage run
    assert record.status == FINISHED and record.resumed_at == [saved_step]
    (stage,) = [run for run in mlflow_runs(tmp_path, "resume") if run.info.run_id == record.mlflow_run_id]
    assert stage.info.status == "FINISHED" and stage.data.tags["mlflow.parentRunId"] == runs[1].info.run_id
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(tmp_path, "resume"))
    (parent,) = mlflow_runs(tmp_path, "resume", "study")
    assert parent.data.metrics["trials_complete"] == 2 and parent.info.status == "FINISHED"
