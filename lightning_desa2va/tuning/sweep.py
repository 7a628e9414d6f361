"""``desa2va sweep``: check the spec, open (or resume) the study and its MLflow parent run, run the trials in
one or several worker processes, then log the study's summary, plots and (for ablations) the table.

Everything a trial could trip on in the spec is composed first, so a bad key or choice fails naming its spec
field before any trial starts; the synthetic shards are written once here, before any worker starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from hydra.errors import HydraException
from omegaconf import OmegaConf

from lightning_desa2va.config import ConfigError, compose_config
from lightning_desa2va.console import quiet_third_party_output
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.tuning.ablation import AblationReport, build_report
from lightning_desa2va.tuning.mlflow_runs import StudyRuns, flat_spec
from lightning_desa2va.tuning.objective import TrialObjective
from lightning_desa2va.tuning.spec import (
    SweepSpec,
    SweepSpecError,
    base_overrides,
    candidate_overrides,
    merge_overrides,
    number_of_trials,
    one_line,
)
from lightning_desa2va.tuning.study import (
    StudyProgress,
    count_trials,
    load_study,
    open_storage,
    storage_url,
    study_dir,
    work,
)

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often the driver of several workers redraws the progress bar
PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
}
"""Optuna's plots of a study, saved as PNGs on the parent run (each needs enough trials to draw)."""


@dataclass
class SweepResult:
    study: optuna.Study
    folder: Path
    parent_run_id: str
    report: AblationReport | None


@dataclass
class _Setup:
    """What every worker process needs to open the study and run trials (picklable)."""

    spec: SweepSpec
    overrides: list[str]
    experiments_dir: Path | None
    tracking_uri: str
    storage: str
    n_trials: int

    def open(self) -> tuple[optuna.Study, TrialObjective]:
        storage = open_storage(self.storage, self.spec, self.tracking_uri)
        objective = TrialObjective(self.spec, self.overrides, self.experiments_dir, self.tracking_uri)
        return load_study(self.spec, storage), objective


def check_trial_configs(spec: SweepSpec, overrides: list[str], experiments_dir: Path | None) -> None:
    """Compose the base config and each choice's: an error names the spec field (or the overrides)."""
    for field_name, extra in {"experiment / overrides": [], **candidate_overrides(spec)}.items():
        try:
            compose_config(merge_overrides(overrides, extra), experiments_dir)
        except (HydraException, ConfigError) as error:
            raise SweepSpecError(
                f"sweep spec field '{field_name}' ({' '.join(extra)}): {one_line(error)}"
            ) from error


def run_sweep(
    spec: SweepSpec, cli_overrides: list[str], experiments_dir: Path | None = None, workers: int = 1
) -> SweepResult:
    """Run (or resume) the study to its number of finished trials and summarise it."""
    overrides = base_overrides(spec, cli_overrides)
    check_trial_configs(spec, overrides, experiments_dir)
    cfg = compose_config(overrides, experiments_dir)
    if cfg.logger is None:
        raise SweepSpecError("a sweep logs every trial to MLflow: logger must not be null")
    ensure_synthetic_shards(cfg)
    folder = study_dir(Path(cfg.paths.output_dir), spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(spec)))
    setup = _Setup(
        spec,
        overrides,
        experiments_dir,
        cfg.logger.tracking_uri,
        storage_url(spec, folder),
        number_of_trials(spec),
    )
    study, objective = setup.open()
    runs = StudyRuns(setup.tracking_uri, spec.name)
    parent_id = runs.open_parent(study, flat_spec(spec))
    log.info("study %s: storage %s, MLflow parent run %s", spec.name, setup.storage, parent_id)
    progress = StudyProgress(spec.name, setup.n_trials, spec.metric)
    try:
        if workers == 1:
            work(study, objective, setup.n_trials, progress)
        else:
            _run_workers(setup, workers, study, progress)
    finally:
        progress.refresh(study)
        progress.close()
    report = build_report(study, spec, folder) if spec.ablation else None
    files = [folder / "trials.csv", *(report.files if report else [])]
    study.trials_dataframe().to_csv(files[0], index=False)
    runs.log_summary(parent_id, study, save_plots(study, folder), files)
    runs.finish_parent(parent_id)
    return SweepResult(study, folder, parent_id, report)


def _run_workers(setup: _Setup, workers: int, study: optuna.Study, progress: StudyProgress) -> None:
    """``workers`` processes on the one storage; this one redraws the bar until they are done."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(setup,), name=f"worker-{i}") for i in range(workers)]
    for process in processes:
        process.start()
    while any(process.is_alive() for process in processes):
        progress.refresh(study)
        time.sleep(POLL_S)
    failed = [process.name for process in processes if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"sweep workers {', '.join(failed)} exited with an error (see their log above)")


def _worker(setup: _Setup) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(processName)s %(name)s: %(message)s")
    quiet_third_party_output()
    study, objective = setup.open()
    work(study, objective, setup.n_trials, None)


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots of the study as PNGs; a plot the study cannot draw yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    paths = []
    for name, plot in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log.info("no %s plot: %s", name, error)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        pyplot.close(figure)
        paths.append(path)
    return paths


def summary_lines(result: SweepResult) -> list[str]:
    """What the command prints after the bar: counts, the best trial, where everything is."""
    study = result.study
    counts = count_trials(study)
    states = f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed"
    lines = [f"study {study.study_name}: {states}"]
    if counts.complete:
        best = study.best_trial
        lines.append(f"best trial {best.number} ({best.user_attrs.get('run_name')}): {best.value:.4f}")
    lines.append(f"study files in {result.folder}; MLflow parent run {result.parent_run_id}")
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
