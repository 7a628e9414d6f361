"""``desa2va sweep``: check the spec, open (or resume) the study and its MLflow parent run, run the trials in
one or several worker processes, confirm a search's best on test, then log the study's summary, plots and
table (an ablation's variants, or a search's confirmed configurations) to the parent run.

Everything a trial could trip on is composed first, so a bad key or choice, a metric the last stage does not
log, a ``prune_stage`` the pipeline lacks or an ablation whose arms train unequal steps fails naming its spec
field before any trial starts; the synthetic shards are written once here, before any worker starts.
SIGINT / SIGTERM stop the whole study: the running trial failed and re-queued, the parent run KILLED, the
command exits with ``128 + signum``; the same command resumes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow.entities import RunStatus
from omegaconf import OmegaConf

from lightning_desa2va.console import markdown_table, quiet_third_party_output
from lightning_desa2va.errors import RunInterrupted
from lightning_desa2va.files import atomic_write, atomic_write_text
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.tuning.ablation import AblationReport, build_report
from lightning_desa2va.tuning.checks import check_shared_tracking, check_trial_configs
from lightning_desa2va.tuning.confirm import confirm, confirmation_report
from lightning_desa2va.tuning.metric_names import TRIAL_MEASURES
from lightning_desa2va.tuning.mlflow_runs import RetryStaleTrial, StudyRuns, best_trials, flat_spec
from lightning_desa2va.tuning.mlflow_view import save_view
from lightning_desa2va.tuning.objective import TrialObjective
from lightning_desa2va.tuning.plots import save_plots
from lightning_desa2va.tuning.spec import (
    SweepSpec,
    SweepSpecError,
    base_overrides,
    number_of_trials,
    storage_url,
    study_dir,
)
from lightning_desa2va.tuning.start_lock import TrialStartLock
from lightning_desa2va.tuning.study import (
    StudyProgress,
    count_trials,
    created_here,
    heartbeats,
    load_study,
    open_storage,
    stop_on_signals,
    work,
)

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often the driver of several workers redraws the progress bar
JOIN_S = 60.0  # how long an interrupted driver waits for its workers to re-queue their trials


@dataclass
class SweepResult:
    study: optuna.Study
    folder: Path
    parent_run_id: str
    report: AblationReport | None
    url: str
    spec_metrics: list[str]


CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
TRIALS_DIR = "trials"
"""The study folder's subfolder of trial pipeline records (a re-queued trial continues from them)."""


@dataclass
class _Setup:
    """What every worker process needs to open the study and run trials (picklable)."""

    spec: SweepSpec
    overrides: list[str]
    experiments_dir: Path | None
    tracking_uri: str
    storage: str
    n_trials: int
    folder: Path

    def open(self) -> tuple[optuna.Study, TrialObjective, RetryStaleTrial | None]:
        retry = RetryStaleTrial(self.tracking_uri, self.spec.name) if heartbeats(self.storage) else None
        storage = open_storage(self.storage, self.spec, retry)
        objective = TrialObjective(
            self.spec,
            self.overrides,
            self.experiments_dir,
            self.tracking_uri,
            self.n_trials,
            self.folder / TRIALS_DIR,
        )
        return load_study(self.spec, storage), objective, retry

    def start_lock(self) -> TrialStartLock:
        return TrialStartLock(self.storage, self.spec.name)


def run_sweep(
    spec: SweepSpec, cli_overrides: list[str], experiments_dir: Path | None = None, workers: int = 1
) -> SweepResult:
    """Run (or resume) the study to its number of finished trials, confirm a search's best on test and
    summarise it; the parent run is closed however this ends (KILLED when interrupted, FAILED on an error)."""
    overrides = base_overrides(spec, cli_overrides)
    cfg = check_trial_configs(spec, overrides, experiments_dir)
    if cfg.logger is None:
        raise SweepSpecError("a sweep logs every trial to MLflow: logger must not be null")
    check_shared_tracking(spec.storage, cfg.logger.tracking_uri)
    ensure_synthetic_shards(cfg)
    folder = study_dir(Path(cfg.paths.output_dir), spec)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "spec.yaml", OmegaConf.to_yaml(OmegaConf.structured(spec)))
    setup = _Setup(
        spec,
        overrides,
        experiments_dir,
        cfg.logger.tracking_uri,
        storage_url(spec, folder),
        number_of_trials(spec),
        folder,
    )
    study, objective, retry = setup.open()
    runs = StudyRuns(setup.tracking_uri, spec.name)
    parent_id = runs.open_parent(study, flat_spec(spec), created_here(study))
    url = save_view(runs, spec)
    log.info("study %s: storage %s, MLflow parent run %s", spec.name, setup.storage, parent_id)
    log.info("compare the trials in MLflow (make ui): %s", url)
    progress = StudyProgress(spec.name, setup.n_trials, spec.metric[0])
    try:
        with stop_on_signals():
            try:
                if workers == 1:
                    work(study, objective, setup.n_trials, retry, [progress.refresh], setup.start_lock())
                else:
                    _run_workers(setup, workers, study, progress)
            finally:
                progress.refresh(study)
                progress.close()
            report = summarise(study, spec, objective, folder)
            files = [folder / "trials.csv", *(report.files if report else [])]
            atomic_write(files[0], lambda path: study.trials_dataframe().to_csv(path, index=False))
            plots = save_plots(study, spec, folder)
            runs.log_summary(parent_id, study, plots, files, description(spec, report, url))
    except RunInterrupted:
        runs.finish_parent(parent_id, RunStatus.KILLED)
        raise
    except BaseException:
        runs.finish_parent(parent_id, RunStatus.FAILED)
        raise
    runs.finish_parent(parent_id)
    return SweepResult(study, folder, parent_id, report, url, list(spec.metric))


def summarise(
    study: optuna.Study, spec: SweepSpec, objective: TrialObjective, folder: Path
) -> AblationReport | None:
    """An ablation's table; a search's best configurations confirmed on test and their table."""
    if spec.ablation:
        return build_report(study, spec, folder)
    if not spec.confirm.top or not count_trials(study).complete:
        return None
    confirm(study, spec, objective)
    return confirmation_report(study, spec, folder)


def description(spec: SweepSpec, report: AblationReport | None, url: str) -> str:
    """The parent run's description (markdown): the table, its notes and where to compare the trials."""
    parts = [f"**{spec.name}** ({spec.profile} profile). Trials side by side: {url}"]
    if report is not None:
        parts += [report.table.title, markdown_table(report.table), *report.notes]
    return "\n\n".join(parts)


def _run_workers(setup: _Setup, workers: int, study: optuna.Study, progress: StudyProgress) -> None:
    """``workers`` processes on the one storage; this one redraws the bar until they are done. Stopped, it
    passes SIGTERM on to the workers (each fails and re-queues its trial) and waits for them."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(setup,), name=f"worker-{i}") for i in range(workers)]
    for index, process in enumerate(processes):
        with own_device(index):
            process.start()
    try:
        while any(process.is_alive() for process in processes):
            progress.refresh(study)
            time.sleep(POLL_S)
    except RunInterrupted:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(JOIN_S)
        raise
    failed = [process.name for process in processes if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"sweep workers {', '.join(failed)} exited with an error (see their log above)")


@contextmanager
def own_device(worker: int) -> Iterator[None]:
    """Start a worker seeing one GPU of this machine's (round robin), as ``CUDA_VISIBLE_DEVICES`` says to a
    process started in the block; on a machine without GPUs, nothing changes."""
    count = torch.cuda.device_count()
    if count == 0:
        yield
        return
    visible = os.environ.get(CUDA_VISIBLE, ",".join(map(str, range(count)))).split(",")
    previous = os.environ.get(CUDA_VISIBLE)
    os.environ[CUDA_VISIBLE] = visible[worker % len(visible)]
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CUDA_VISIBLE)
        else:
            os.environ[CUDA_VISIBLE] = previous


def _worker(setup: _Setup) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(processName)s %(name)s: %(message)s")
    quiet_third_party_output()
    study, objective, retry = setup.open()
    try:
        work(study, objective, setup.n_trials, retry, [], setup.start_lock())
    except RunInterrupted as stop:
        sys.exit(stop.exit_code)


def summary_lines(result: SweepResult) -> list[str]:
    """What the command prints after the bar: counts, the best trial, where everything is."""
    study = result.study
    counts = count_trials(study)
    states = f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed"
    lines = [f"study {study.study_name}: {states}"]
    metrics = ", ".join(f"val/{name}" if name not in TRIAL_MEASURES else name for name in result.spec_metrics)
    for rank, best in enumerate(best_trials(study)):
        values = ", ".join(f"{value:.4f}" for value in best.values)
        which = "best on val" if len(best.values) == 1 else f"Pareto front #{rank + 1}"
        lines.append(
            f"{which} ({metrics}): trial {best.number} ({best.user_attrs.get('run_name')}): {values}"
        )
    lines.append(f"study files in {result.folder}; MLflow parent run {result.parent_run_id}")
    lines.append(f"compare the trials in MLflow (make ui): {result.url}")
    return lines


def nothing_completed(result: SweepResult) -> str | None:
    """Why a study that ended without one complete trial failed (a command then exits non-zero: there is
    nothing to compare), or None."""
    counts = count_trials(result.study)
    if counts.complete or not counts.failed:
        return None
    return (
        f"study {result.study.study_name}: no trial completed ({counts.failed} failed, {counts.pruned} "
        f"pruned; their errors are in the log above); fix the cause and remove {result.folder} to start over"
    )
