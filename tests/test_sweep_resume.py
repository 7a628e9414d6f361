"""A sweep killed (SIGKILL) in the middle of a trial and started again ends with exactly its number of
complete trials, none lost or run twice, in Optuna and in MLflow: the dead trial failed, its configuration
re-queued."""

from __future__ import annotations

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
    WHERE trials.number = 1 AND trials.state = 'RUNNING' AND trial_user_attributes.key = 'mlflow_run_id'
"""


def second_trial_started(storage: Path) -> bool:
    """Whether trial 1 runs and has its MLflow run (read from the SQLite file: quick enough to poll)."""
    if not storage.exists():
        return False
    with closing(sqlite3.connect(storage, timeout=POLL_S)) as connection:
        try:
            return connection.execute(RUNNING_WITH_RUN).fetchone() is not None
        except sqlite3.OperationalError:  # tables not created yet, or locked by a write
            return False


def test_a_sweep_killed_mid_trial_resumes_to_exactly_its_trials(tmp_path):
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal"]}}
    spec = write_spec(tmp_path, "resume", space)
    process = start_sweep(tmp_path, spec)
    deadline = time.monotonic() + WAIT_S
    storage = tmp_path / "outputs/sweeps/resume/optuna.db"
    while not second_trial_started(storage):  # then kill it in the middle of that trial
        assert process.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    time.sleep(POLL_S)
    process.kill()
    process.wait()

    run_sweep_process(tmp_path, spec)

    trials = load_study(tmp_path, "resume").get_trials()
    states = [trial.state for trial in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].system_attrs["failed_trial"] == 1  # the retry of the killed trial
    assert trials[2].params == trials[1].params
    assert sorted(trial.params["decoupler"] for trial in trials if trial.state == TrialState.COMPLETE) == [
        "linear",
        "orthogonal",
    ]

    runs = {int(run.data.tags["sweep.trial"]): run for run in mlflow_runs(tmp_path, "resume", "trial")}
    assert sorted(runs) == [0, 1, 2]
    assert {number: (run.info.status, run.data.tags["sweep.state"]) for number, run in runs.items()} == {
        0: ("FINISHED", "COMPLETE"),
        1: ("FAILED", "FAIL"),
        2: ("FINISHED", "COMPLETE"),
    }
    assert runs[1].info.run_id == trials[1].user_attrs["mlflow_run_id"]
    assert runs[2].info.run_id == trials[2].user_attrs["mlflow_run_id"]
    assert all(run.info.status != "RUNNING" for run in mlflow_runs(tmp_path, "resume"))
    (parent,) = mlflow_runs(tmp_path, "resume", "study")
    assert parent.data.metrics["trials_complete"] == 2 and parent.info.status == "FINISHED"
