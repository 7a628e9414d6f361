"""Two worker processes share one study without collision; that study (an ablation of two metrics, val J&F and
step time) plots its Pareto front and prints intervals and paired differences, and
notebooks/compare_variants.ipynb, run headless against it, shows the same comparison, ranked by val."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from optuna.trial import TrialState
from sweep_runs import REPO_ROOT, load_study, mlflow_runs, run_sweep_process, tracking_uri, write_spec

from lightning_desa2va.tuning.ablation import collect_variants, comparison_table
from lightning_desa2va.tuning.spec import load_spec

pytestmark = pytest.mark.long(seconds=41)

NOTEBOOK = REPO_ROOT / "notebooks" / "compare_variants.ipynb"
NOTEBOOK_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def shared_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    space = {"decoupler": {"type": "categorical", "choices": ["linear", "orthogonal"]}}
    # a DataLoader worker of its own in each sweep worker, as the packaged data config has
    options = {
        "ablation": True,
        "baseline": "linear",
        "metric": ["JF", "step_s"],
        "direction": ["maximize", "minimize"],
    }
    spec = write_spec(root, "workers", space, **options)
    run_sweep_process(root, spec, "--workers", "2", "data.num_workers=1")
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


def test_a_two_metric_study_plots_its_pareto_front_and_prints_intervals(shared_study):
    assert [len(trial.values) for trial in load_study(shared_study, "workers").get_trials()] == [2, 2]
    (parent,) = mlflow_runs(shared_study, "workers", "study")
    plots = {
        a.path for a in MlflowClient(tracking_uri(shared_study)).list_artifacts(parent.info.run_id, "plots")
    }
    assert "plots/pareto_front.png" in plots
    printed = (shared_study / "sweep.log").read_text()
    assert "J&F 95% CI" in printed and "Δ vs control" in printed and "control" in printed


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
        rows = list(csv.DictReader(stream))
    table = {row["variant"]: row for row in rows}
    study = load_study(shared_study, "workers")
    trials = study.get_trials()
    expected = {f"decoupler={trial.params['decoupler']}": trial for trial in trials}
    assert table.keys() == expected.keys()
    ranked = sorted(expected, key=lambda variant: -expected[variant].values[0])
    assert [row["variant"] for row in rows] == ranked  # by val
    spec = load_spec(shared_study / "workers.yaml")
    summary = comparison_table(spec, "", collect_variants(study, spec))
    reported = {row[0].split()[0]: dict(zip(summary.headers, row, strict=True)) for row in summary.rows}
    for variant, trial in expected.items():
        tests = trial.user_attrs["test"]
        assert int(table[variant]["seeds"]) == len(tests)
        for metric in ("JF", "JF/static", "qa_accuracy"):
            mean = float(table[variant][f"test/{metric} mean"])
            assert mean == pytest.approx(statistics.fmean(test[metric] for test in tests), abs=1e-6)
        study_row = reported[trial.params["decoupler"]]
        for column in ("J&F 95% CI", "Δ vs control", "Δ vs best"):
            assert table[variant][column] == study_row[column]
