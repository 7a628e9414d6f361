"""``desa2va sweep``: an Optuna study (or an ablation grid) over the pipeline, described by a sweep spec;
``desa2va ui`` and ``desa2va dashboard``: MLflow's UI and optuna-dashboard on what the studies logged.

The spec (its metric too) is read and checked before the model stack is imported, so a bad one fails in
about a second."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lightning_desa2va.cli.help import add_command
from lightning_desa2va.console import print_table

MLFLOW_PORT = 5000  # `make ui`'s port, in the URLs the sweeps print
DASHBOARD_PORT = 8080  # optuna-dashboard's own default
LOOPBACK = "127.0.0.1"


def register(commands: argparse._SubParsersAction) -> None:
    sweep = add_command(
        commands,
        "sweep",
        "run (or resume) an Optuna study over the pipeline from a sweep spec; ablations print their table",
        "desa2va sweep sweeps/ablate_decoupler.yaml --profile quick --workers 2",
        takes_overrides=True,
        positionals=[("spec", "a sweep spec (sweeps/*.yaml)")],
    )
    sweep.add_argument("--profile", default="default", help="a profile of the spec (e.g. quick)")
    sweep.add_argument("--workers", type=int, default=1, help="worker processes sharing the study's storage")
    sweep.set_defaults(run=_sweep)
    ui = add_command(
        commands,
        "ui",
        "MLflow's UI on 127.0.0.1, after printing the URL of each study's comparison view",
        "desa2va ui --backend-store-uri sqlite:///mlflow.db",
        takes_overrides=False,
    )
    ui.add_argument("--backend-store-uri", default="sqlite:///mlflow.db", help="the MLflow store")
    ui.add_argument("--port", type=int, default=MLFLOW_PORT)
    ui.set_defaults(run=_ui)
    dashboard = add_command(
        commands,
        "dashboard",
        "optuna-dashboard on 127.0.0.1 on a study's storage (trials, history, importances, Pareto front)",
        "desa2va dashboard sweeps/decoupler_fusion.yaml --profile quick",
        takes_overrides=False,
        positionals=[("spec", "the sweep spec of the study (sweeps/*.yaml)")],
    )
    dashboard.add_argument("--profile", default="default", help="the profile the study ran with")
    dashboard.add_argument(
        "--output-dir", type=Path, default=Path("outputs"), help="the run's paths.output_dir"
    )
    dashboard.add_argument("--port", type=int, default=DASHBOARD_PORT)
    dashboard.set_defaults(run=_dashboard)


def _sweep(args: argparse.Namespace) -> None:
    from lightning_desa2va.tuning.spec import SweepSpecError, load_spec

    if args.workers < 1:
        raise SweepSpecError(f"--workers must be at least 1, got {args.workers}")
    spec = load_spec(Path(args.spec), args.profile)

    from lightning_desa2va.errors import RunInterrupted
    from lightning_desa2va.tuning.sweep import nothing_completed, run_sweep, summary_lines

    try:
        result = run_sweep(spec, args.overrides, args.experiments_dir, args.workers)
    except RunInterrupted as stop:
        print(
            f"desa2va: study {spec.name} stopped ({stop}): its running trial failed and re-queued, the "
            "MLflow parent run closed; run the same command to resume",
            file=sys.stderr,
        )
        sys.exit(stop.exit_code)
    lines = summary_lines(result)
    if result.report is None:
        for line in lines:
            print(line)
    else:
        files = ", ".join(map(str, result.report.files))
        print_table(result.report.table, [*result.report.notes, f"chart and table: {files}", *lines])
    failure = nothing_completed(result)
    if failure:
        sys.exit(f"desa2va: error: {failure}")


def _ui(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    from lightning_desa2va.tuning.mlflow_view import VIEW_TAG

    address = f"http://{LOOPBACK}:{args.port}"
    for experiment in MlflowClient(tracking_uri=args.backend_store_uri).search_experiments():
        if VIEW_TAG in experiment.tags:
            print(f"study {experiment.name}: {address}{experiment.tags[VIEW_TAG]}")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri]
    sys.stdout.flush()  # exec replaces the process: what was printed must be out first
    os.execv(sys.executable, [*command, "--host", LOOPBACK, "--port", str(args.port)])


def _dashboard(args: argparse.Namespace) -> None:
    from lightning_desa2va.tuning.spec import JOURNAL_SUFFIX, load_spec, storage_url, study_dir

    spec = load_spec(Path(args.spec), args.profile)
    folder = study_dir(args.output_dir, spec)
    url = storage_url(spec, folder)
    if spec.storage is None and not folder.is_dir():
        raise FileNotFoundError(
            f"no study {spec.name} in {folder.parent} (run desa2va sweep {args.spec} first)"
        )
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_dashboard import run_server

    storage = JournalStorage(JournalFileBackend(url)) if url.endswith(JOURNAL_SUFFIX) else url
    print(f"optuna-dashboard for study {spec.name} ({url}): http://{LOOPBACK}:{args.port}")
    run_server(storage, host=LOOPBACK, port=args.port)
