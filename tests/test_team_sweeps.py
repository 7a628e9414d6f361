"""Sweeps at a team's scale, on real services started here: PostgreSQL holds the study and an MLflow
server the runs. Three sweep processes share one study, as three machines would; one is killed (SIGKILL) in
the middle of a trial. The study ends with exactly its trials, the dead one failed and retried, and every run
is in the one server under the study's parent run. A study in a database server that would log to a local
store is refused in one line."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sweep_runs import EXPERIMENTS, LONGER_TRIALS, start_sweep, write_spec

from lightning_desa2va.cli import main
from lightning_desa2va.services import Services

pytestmark = pytest.mark.long(seconds=52)

STUDY = "team"
MACHINES = 3
POLL_S = 0.5
WAIT_S = 900
SHARED_FOLDER_MODE = 0o755  # the postgres user must reach the cluster (pytest's folders are private)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    folder = Path(tempfile.mkdtemp(prefix="desa2va-services-"))
    folder.chmod(SHARED_FOLDER_MODE)
    started = Services(folder / "services", postgres_port=free_port(), mlflow_port=free_port())
    started.start()
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(folder, ignore_errors=True)


def running_trial_of(study: optuna.Study, pid: int) -> bool:
    """Whether the process ``pid`` is in the middle of a trial (its trial runs and has its MLflow run)."""
    return any(
        trial.state == TrialState.RUNNING
        and trial.user_attrs.get("worker", "").endswith(f":{pid}")
        and "mlflow_run_id" in trial.user_attrs
        for trial in study.get_trials(deepcopy=False)
    )


def test_three_machines_share_a_postgresql_study_and_an_mlflow_server_through_a_kill(
    services: Services, tmp_path: Path
) -> None:
    storage = services.postgres_url("optuna")
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal", "mlp"]}}
    spec = write_spec(tmp_path, STUDY, space, storage=storage, overrides=LONGER_TRIALS)
    machines = [  # started together: one of them makes the study and its parent run, the others join
        start_sweep(tmp_path, spec, tracking=services.mlflow_url, log_name=f"machine-{index}.log")
        for index in range(MACHINES)
    ]
    try:
        deadline = time.monotonic() + WAIT_S
        database = optuna.storages.RDBStorage(storage)  # one connection pool for every poll (each makes one)
        while True:
            try:
                study = optuna.load_study(study_name=STUDY, storage=database)
                break
            except KeyError:
                assert time.monotonic() < deadline
                time.sleep(POLL_S)
        victim = machines[1]
        while not running_trial_of(study, victim.pid):
            assert victim.poll() is None and time.monotonic() < deadline, "no trial to kill the machine in"
            time.sleep(POLL_S)
        time.sleep(POLL_S)
        victim.send_signal(signal.SIGKILL)
        for index, machine in enumerate(machines):
            code = machine.wait(timeout=WAIT_S)
            log = (tmp_path / f"machine-{index}.log").read_text()
            assert code == (-signal.SIGKILL if machine is victim else 0), log[-3000:]

    finally:  # a failed check leaves no machine running
        for machine in machines:
            if machine.poll() is None:
                machine.kill()

    trials = optuna.load_study(study_name=STUDY, storage=database).get_trials()
    states = [trial.state for trial in trials]
    shown = [(t.number, t.state.name, t.params, t.system_attrs, t.user_attrs.get("worker")) for t in trials]
    assert states.count(TrialState.COMPLETE) == len(space["decoupler"]["choices"]), shown
    (dead,) = [trial for trial in trials if trial.state == TrialState.FAIL]
    (retry,) = [trial for trial in trials if trial.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert dead.user_attrs["worker"].endswith(f":{victim.pid}")

    client = MlflowClient(tracking_uri=services.mlflow_url)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [run for run in runs if run.data.tags.get("sweep.role") == "study"]
    by_id = {run.info.run_id: run for run in runs}
    for run in runs:
        while (up := run.data.tags.get("mlflow.parentRunId")) is not None:
            run = by_id[up]
        assert run.info.run_id == parent.info.run_id  # every run descends from the one parent
    assert all(run.info.status != "RUNNING" for run in runs)
    trial_runs = {run.info.run_id for run in runs if run.data.tags.get("sweep.role") == "trial"}
    assert {trial.user_attrs["mlflow_run_id"] for trial in trials} == trial_runs


def test_a_shared_study_that_would_log_to_a_local_store_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, "scattered", {"decoupler": {"type": "categorical", "choices": ["linear"]}})
    spec.write_text(spec.read_text() + "storage: postgresql://postgres@db.example:5432/optuna\n")
    monkeypatch.chdir(tmp_path)
    store = f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SystemExit) as stopped:
        main(["--experiments-dir", str(EXPERIMENTS), "sweep", str(spec), store])
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'storage' (db.example:5432/optuna) is a database server" in line and "MLFLOW_TRACKING_URI" in line
