"""A sweep stopped with Ctrl-C (SIGINT) in the middle of a trial exits cleanly (the trial failed and
re-queued, the parent run closed, exit status 130); one killed outright (SIGKILL) leaves a trial that the next
start finds dead by its heartbeat. Started again after each, the study ends with exactly its number of
complete trials, none lost or run twice, and no trial or run left RUNNING, in Optuna and in MLflow."""

from __future__ import annotations

import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from optuna.trial import TrialState
from sweep_runs import load_study, mlflow_runs, run_sweep_process, start_sweep, write_spec

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


def stop_in_trial(root: Path, spec: Path, number: int, signum: int) -> int:
    """Start the sweep, send ``signum`` in the middle of trial ``number``; its exit status."""
    process = start_sweep(root, spec)
    storage = root / "outputs/sweeps/resume/optuna.db"
    deadline = time.monotonic() + WAIT_S
    while not trial_started(storage, number):
        assert process.poll() is None, "the sweep ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    time.sleep(POLL_S)
    process.send_signal(signum)
    return process.wait(timeout=WAIT_S)


def test_a_sweep_interrupted_or_killed_mid_trial_resumes_to_exactly_its_trials(tmp_path):
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal"]}}
    spec = write_spec(tmp_path, "resume", space)

    assert stop_in_trial(tmp_path, spec, 0, signal.SIGINT) == SIGINT_EXIT
    assert [t.state for t in load_study(tmp_path, "resume").get_trials()] == [
        TrialState.FAIL,
        TrialState.WAITING,
    ]
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(tmp_path, "resume"))
    (parent,) = mlflow_runs(tmp_path, "resume", "study")
    assert parent.info.status == "KILLED"
    assert "stopped (sweep stopped by SIGINT)" in (tmp_path / "sweep.log").read_text()

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
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(tmp_path, "resume"))
    (parent,) = mlflow_runs(tmp_path, "resume", "study")
    assert parent.data.metrics["trials_complete"] == 2 and parent.info.status == "FINISHED"
