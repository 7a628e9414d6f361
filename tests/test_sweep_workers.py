"""Two worker processes share one study without collision, and notebooks/compare_variants.ipynb, run headless
against that study, shows a comparison table that matches its runs."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from optuna.trial import TrialState
from sweep_runs import REPO_ROOT, load_study, mlflow_runs, run_sweep_process, tracking_uri, write_spec

NOTEBOOK = REPO_ROOT / "notebooks" / "compare_variants.ipynb"
NOTEBOOK_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def shared_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal"]}}
    # a DataLoader worker of its own in each sweep worker, as the packaged data config has
    run_sweep_process(root, write_spec(root, "workers", space), "--workers", "2", "data.num_workers=1")
    return root


def test_two_workers_share_one_study_without_collision(shared_study):
    trials = load_study(shared_study, "workers").get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert sorted(trial.params["decoupler"] for trial in trials) == ["linear", "orthogonal"]
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2  # one trial in each process
    runs = mlflow_runs(shared_study, "workers", "trial")
    assert sorted(run.data.tags["sweep.trial"] for run in runs) == ["0", "1"]
    assert {run.info.run_id for run in runs} == {trial.user_attrs["mlflow_run_id"] for trial in trials}
    assert all(run.info.status == "FINISHED" for run in mlflow_runs(shared_study, "workers"))


def test_the_notebook_executes_and_its_table_matches_the_study_runs(shared_study):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    table_file = shared_study / "table.csv"
    parameters.source = (
        f'STUDY = "workers"\nTRACKING_URI = "{tracking_uri(shared_study)}"\nOUTPUT_CSV = "{table_file}"'
    )
    client = NotebookClient(
        notebook, timeout=NOTEBOOK_TIMEOUT_S, resources={"metadata": {"path": shared_study}}
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # the per-type bars and the learning curves

    with table_file.open() as stream:
        table = {row["variant"]: row for row in csv.DictReader(stream)}
    trials = load_study(shared_study, "workers").get_trials()
    expected = {f"decoupler={trial.params['decoupler']}": trial.user_attrs["test"] for trial in trials}
    assert table.keys() == expected.keys()
    for variant, tests in expected.items():
        assert int(table[variant]["seeds"]) == len(tests)
        for metric in ("JF", "JF/static", "qa_accuracy"):
            mean = float(table[variant][f"test/{metric} mean"])
            assert mean == pytest.approx(statistics.fmean(test[metric] for test in tests), abs=1e-6)
