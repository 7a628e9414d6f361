"""The Optuna side of a sweep: storage, sampler, pruner, and the worker loop that runs trials until the study
holds its number of finished trials.

Storage is SQLite beside the study's outputs unless the spec names another: any RDB URL, or a ``*.journal``
file (Optuna's JournalStorage, for several workers on a file system without a database). RDB storage keeps a
heartbeat per running trial; a trial whose process died is failed on the next start and re-queued once
(:class:`~lightning_desa2va.tuning.mlflow_runs.RetryStaleTrial`).

Several workers share one study: each loop starts a trial (Optuna's ``study.optimize``, one trial at a time)
only while the finished and running trials fall short of ``n_trials`` or a retry waits, deciding and creating
the trial under a lock the workers share (:mod:`~lightning_desa2va.tuning.start_lock`), so the study ends
with exactly that many finished trials however many workers on however many machines run it. SIGINT and
SIGTERM stop the loop cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from lightning_desa2va.errors import RunInterrupted
from lightning_desa2va.tuning.mlflow_runs import RetryStaleTrial
from lightning_desa2va.tuning.objective import TrialObjective
from lightning_desa2va.tuning.spec import JOURNAL_SUFFIX, Pruner, Sampler, SweepSpec, grid_values
from lightning_desa2va.tuning.start_lock import TrialStartLock

log = logging.getLogger(__name__)

SQLITE_TIMEOUT_S = 60  # how long a worker waits for another's write to the shared SQLite file
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def heartbeats(url: str) -> bool:
    """Whether the storage at ``url`` keeps heartbeats (RDB storage does, a journal file does not)."""
    return not url.endswith(JOURNAL_SUFFIX)


def open_storage(url: str, spec: SweepSpec, retry: RetryStaleTrial | None) -> BaseStorage:
    """The study's storage; RDB storage with heartbeats and ``retry`` for dead trials."""
    if not heartbeats(url):
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
            heartbeat_stale_trial_callback=retry,
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


CREATOR_ATTR = "created_by"


def created_here(study: optuna.Study) -> bool:
    """Whether this process created the study."""
    return study.user_attrs.get(CREATOR_ATTR) == f"{socket.gethostname()}:{os.getpid()}"


def load_study(spec: SweepSpec, storage: BaseStorage) -> optuna.Study:
    """Create the study, or load it when it exists (running a sweep again resumes it; a worker on another
    machine joins it). Which process created it is recorded (``created``): the storage decides that
    atomically, so exactly one process of a team makes the study's parent run."""
    options = {
        "study_name": spec.name,
        "storage": storage,
        "sampler": build_sampler(spec),
        "pruner": build_pruner(spec),
    }
    try:
        study = optuna.create_study(**options, directions=[d.value for d in spec.direction])
        study.set_user_attr(CREATOR_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**options)
    if study.metric_names != spec.metric:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metric))
    return study


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
        if not counts.complete:
            best = f"best {self.metric} -"
        elif len(study.directions) > 1:
            best = f"Pareto front {len(study.best_trials)}"
        else:
            best = f"best {self.metric} {study.best_value:.4f}"
        summary = f"done {counts.complete} pruned {counts.pruned} failed {counts.failed} {best}"
        self.bar.n = counts.finished
        self.bar.set_postfix_str(summary)
        if trial is not None:
            log.info("trial %d %s; %s", trial.number, trial.state.name.lower(), summary)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` in this process (the one that entered the block, not
    the DataLoader workers it forks) and are ignored after the first, so cleanup is not cut short; the
    handlers before are restored on leaving. Lightning's own SIGTERM handler calls this one in turn."""
    owner = os.getpid()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            return
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise RunInterrupted(signum, f"sweep stopped by {signal.Signals(signum).name}")

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def work(
    study: optuna.Study,
    objective: TrialObjective,
    n_trials: int,
    retry: RetryStaleTrial | None,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    lock: TrialStartLock,
) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (a failed trial that was re-queued counts
    through its retry): Optuna's ``fail_stale_trials`` fails dead workers' trials (re-queued by ``retry``),
    and a trial starts only while the study needs one, decided and created under ``lock`` (the objective
    releases it as its trial begins). A trial that raises is failed and the next one starts; SIGINT /
    SIGTERM stop the whole study, the running trial failed and re-queued as a dead worker's is, and
    :class:`RunInterrupted` goes on up."""
    objective.on_start = lock.release
    with stop_on_signals():
        try:
            while True:
                lock.acquire()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                    counts = count_trials(study)
                    start = counts.waiting > 0 or counts.finished + counts.running < n_trials
                    if start:
                        study.optimize(
                            objective,
                            n_trials=1,
                            catch=(Exception,),
                            callbacks=callbacks,
                            gc_after_trial=True,
                        )
                finally:
                    lock.release()
                if start:
                    continue
                if counts.running and retry is not None:
                    # another worker's trial, or a dead one whose heartbeat has not expired yet: wait and see
                    time.sleep(objective.spec.heartbeat_interval)
                else:
                    return
        except (RunInterrupted, KeyboardInterrupt) as stop:
            requeue_running(study, objective, retry)
            if isinstance(stop, KeyboardInterrupt):
                raise RunInterrupted(signal.SIGINT, "sweep stopped by KeyboardInterrupt") from stop
            raise


def requeue_running(study: optuna.Study, objective: TrialObjective, retry: RetryStaleTrial | None) -> None:
    """Fail the trial this process was training and re-queue it, as ``fail_stale_trials`` does for a worker
    that died (without heartbeats, e.g. a journal file: failed only)."""
    number = objective.running
    if number is None:
        return
    trial = next(trial for trial in study.get_trials(deepcopy=False) if trial.number == number)
    if trial.state != TrialState.RUNNING:
        return
    study.tell(number, state=TrialState.FAIL)
    log.warning("trial %d interrupted: failed%s", number, "" if retry is None else " and re-queued")
    if retry is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(study, next(t for t in study.get_trials() if t.number == number))
