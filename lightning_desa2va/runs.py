"""Where a run's files go, named for people: ``outputs/<experiment>/<stage>/<date-time>_<short id>/``.

The folder holds the resolved ``config.yaml``, ``checkpoints/`` and ``run.json`` (the MLflow run id, the
tracking URI, what was run, how it ended and, once finished, its scores), so a run found on disk leads to its
MLflow run, and a run resumed from one of its checkpoints continues in the same folder and MLflow run. A
pipeline (``desa2va demo``, a sweep trial) records which stage runs it made in ``pipeline.json`` under
``outputs/<experiment>/pipelines/``. A process holds its run's lock file while it runs, so a resume can tell
a run that died from one that is still going. Records are written whole or not at all.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from lightning_desa2va.files import atomic_write_text

RUN_FILE = "run.json"
PIPELINE_FILE = "pipeline.json"
PIPELINES_DIR = "pipelines"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
SHORT_ID_CHARS = 8
TIME_FORMAT = "%Y%m%d-%H%M%S"
RUNNING, INTERRUPTED, FAILED, FINISHED = "running", "interrupted", "failed", "finished"


@dataclass
class RunRecord:
    """What ``run.json`` says about a run folder."""

    experiment: str
    stage: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    started: str
    status: str = RUNNING
    """running (or died: nothing ended it), interrupted (a signal), failed, finished."""
    ended: str | None = None
    label: str | None = None
    """How summaries name the stage's output (e.g. "stage 2 (fused mask)"), once finished."""
    checkpoint: str | None = None
    """The final checkpoint, once finished (the next stage starts from it)."""
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    """Once finished: val (and test) scores and the union baseline's, so a finished stage is reused as is."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped by reason over the run (every split, every attempt)."""
    resumed_at: list[int] = field(default_factory=list)
    """The step each resumed attempt continued from (0: the run died before its first checkpoint)."""
    checkpoint_weights: dict[str, int] = field(default_factory=dict)
    """Once finished: the model tensors its checkpoint keeps (trained or loaded) and those it leaves for the
    base folders to rebuild (the frozen foundation weights)."""


def new_run_dir(cfg: DictConfig, run_id: str | None) -> Path:
    """A fresh folder for a run of ``cfg``, named by when it started and the MLflow run id's first chars."""
    folder = Path(cfg.paths.output_dir) / cfg.run.experiment / cfg.run.choices.stage
    return _new_dir(folder, run_id)


def new_pipeline_dir(cfg: DictConfig) -> Path:
    """A fresh folder for a pipeline record of ``cfg``'s experiment."""
    return _new_dir(Path(cfg.paths.output_dir) / cfg.run.experiment / PIPELINES_DIR, None)


def _new_dir(parent: Path, run_id: str | None) -> Path:
    short_id = (run_id or uuid.uuid4().hex)[:SHORT_ID_CHARS]
    path = parent / f"{datetime.now().strftime(TIME_FORMAT)}_{short_id}"
    path.mkdir(parents=True, exist_ok=False)
    return path.resolve()


def run_dir_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run folder a ``<run>/checkpoints/*.ckpt`` belongs to, if it has a ``run.json``."""
    folder = Path(checkpoint).resolve().parent.parent
    return folder if (folder / RUN_FILE).is_file() else None


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
    return path if path.is_file() else None


def write_record(run_dir: Path, record: RunRecord) -> Path:
    return atomic_write_text(run_dir / RUN_FILE, json.dumps(asdict(record), indent=2) + "\n")


def read_record(run_dir: Path) -> RunRecord:
    path = run_dir / RUN_FILE
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot read the run record {path}: {error}") from error


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


@contextmanager
def holding_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block: other processes see the run (or pipeline) as alive."""
    with FileLock(folder / LOCK_FILE):
        yield


def is_alive(folder: Path) -> bool:
    """Whether a process holds ``folder``'s lock (the lock is released when its holder dies)."""
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def newest_first(parent: Path, record_file: str) -> list[Path]:
    """The folders under ``parent`` that hold ``record_file``, newest first (names start with the time)."""
    if not parent.is_dir():
        return []
    return sorted((p.parent for p in parent.glob(f"*/{record_file}")), key=lambda p: p.name, reverse=True)


@dataclass
class PipelineRecord:
    """What ``pipeline.json`` says: the stage runs of one pipeline, in order, and how it ended."""

    experiment: str
    stages: dict[str, str | None]
    """Stage name → its run folder (``None`` until the stage starts)."""
    started: str
    status: str = RUNNING


def write_pipeline(folder: Path, record: PipelineRecord) -> Path:
    return atomic_write_text(folder / PIPELINE_FILE, json.dumps(asdict(record), indent=2) + "\n")


def read_pipeline(folder: Path) -> PipelineRecord:
    path = folder / PIPELINE_FILE
    try:
        return PipelineRecord(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot read the pipeline record {path}: {error}") from error
