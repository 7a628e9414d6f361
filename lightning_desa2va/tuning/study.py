"""The Optuna side of a sweep: storage, sampler, pruner, and the worker loop that runs trials until the study
holds its number of finished trials.

Storage is SQLite beside the study's outputs unless the spec names another: any RDB URL, or a ``*.journal``
file (Optuna's JournalStorage, for several workers on a file system without a database). RDB storage keeps a
heartbeat per running trial; a trial whose process died is failed on the next start and re-queued once
(:class:`~lightning_desa2va.tuning.mlflow_runs.RetryStaleTrial`).

Several workers share one study: each loop starts a trial only while the finished, running and queued trials
fall short of ``n_trials``, so the study ends with that many finished trials however many workers run it.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from lightning_desa2va.tuning.mlflow_runs import RetryStaleTrial
from lightning_desa2va.tuning.objective import TrialObjective
from lightning_desa2va.tuning.spec import Pruner, Sampler, SweepSpec, grid_values

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
STORAGE_FILE = "optuna.db"
SQLITE_TIMEOUT_S = 60  # how long a worker waits for another's write to the shared SQLite file


def study_dir(output_dir: Path, spec: SweepSpec) -> Path:
    """Where a study keeps its storage, plots and tables: ``<paths.output_dir>/sweeps/<study>/``."""
    return (output_dir / "sweeps" / spec.name).resolve()


def storage_url(spec: SweepSpec, folder: Path) -> str:
    return spec.storage or f"sqlite:///{folder / STORAGE_FILE}"


def open_storage(url: str, spec: SweepSpec, tracking_uri: str) -> BaseStorage:
    """The study's storage; RDB storage with heartbeats and the retry of dead trials."""
    if url.endswith(JOURNAL_SUFFIX):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=spec.heartbeat_interval,
            grace_period=spec.grace_period,
            heartbeat_stale_trial_callback=RetryStaleTrial(tracking_uri, spec.name),
        )


def build_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    options = dict(spec.sampler_options)
    if spec.sampler is Sampler.grid:
        return optuna.samplers.GridSampler(grid_values(spec), **options)
    if spec.sampler is Sampler.random:
        return optuna.samplers.RandomSampler(**options)
    if spec.sampler is Sampler.cmaes:
        return optuna.samplers.CmaEsSampler(**options)
    return optuna.samplers.TPESampler(**options)


def build_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    options = dict(spec.pruner_options)
    if spec.pruner is Pruner.median:
        return optuna.pruners.MedianPruner(**options)
    if spec.pruner is Pruner.hyperband:
        return optuna.pruners.HyperbandPruner(**options)
    if spec.pruner is Pruner.threshold:
        return optuna.pruners.ThresholdPruner(**options)
    return optuna.pruners.NopPruner()


def load_study(spec: SweepSpec, storage: BaseStorage) -> optuna.Study:
    """Create the study, or load it when it exists (running a sweep again resumes it)."""
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=build_sampler(spec),
        pruner=build_pruner(spec),
        direction=spec.direction.value,
        load_if_exists=True,
    )


@dataclass
class TrialCounts:
    complete: int
    pruned: int
    failed: int  # failed for good: a dead trial that was re-queued counts through its retry
    running: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count_trials(study: optuna.Study) -> TrialCounts:
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {number for trial in trials for number in RetryStaleTrial.retry_history(trial)}

    def count(state: TrialState) -> int:
        return sum(trial.state == state and trial.number not in retried for trial in trials)

    return TrialCounts(
        count(TrialState.COMPLETE),
        count(TrialState.PRUNED),
        count(TrialState.FAIL),
        count(TrialState.RUNNING),
        count(TrialState.WAITING),
    )


class StudyProgress:
    """A bar of finished trials of ``n_trials``: done / pruned / failed and the best value so far."""

    def __init__(self, study_name: str, n_trials: int, metric: str) -> None:
        self.metric = metric
        self.bar = tqdm(total=n_trials, desc=f"sweep {study_name}", unit="trial", disable=None)

    def refresh(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        counts = count_trials(study)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        best = f"{study.best_value:.4f}" if complete else "-"
        summary = (
            f"done {counts.complete} pruned {counts.pruned} failed {counts.failed} best {self.metric} {best}"
        )
        self.bar.n = counts.finished
        self.bar.set_postfix_str(summary)
        if trial is not None:
            log.info("trial %d %s; %s", trial.number, trial.state.name.lower(), summary)

    def close(self) -> None:
        self.bar.close()


def heartbeat_enabled(study: optuna.Study) -> bool:
    return isinstance(study._storage, optuna.storages._heartbeat.BaseHeartbeat) and (
        study._storage.get_heartbeat_interval() is not None
    )


def work(
    study: optuna.Study, objective: TrialObjective, n_trials: int, progress: StudyProgress | None
) -> None:
    """Run trials one at a time until the study holds ``n_trials`` finished ones; a trial that raises is
    failed (Optuna records it) and the next one starts."""
    callbacks = [progress.refresh] if progress else []
    while True:
        if heartbeat_enabled(study):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        counts = count_trials(study)
        if counts.waiting or counts.finished + counts.running < n_trials:
            study.optimize(
                objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True
            )
        elif counts.running and heartbeat_enabled(study):
            # another worker's trial, or a dead one whose heartbeat has not expired yet: wait and see
            time.sleep(study._storage.get_heartbeat_interval())
        else:
            return
