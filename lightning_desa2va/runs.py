"""Where a run's files go, named for people: ``outputs/<experiment>/<stage>/<date-time>_<short id>/``.

The folder holds the resolved ``config.yaml``, ``checkpoints/`` and ``run.json`` (the MLflow run id, the
tracking URI, what was run), so a run found on disk leads to its MLflow run, and a run resumed from one of
its checkpoints (``resume_from=.../checkpoints/last.ckpt``) continues in the same folder and MLflow run.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
SHORT_ID_CHARS = 8
TIME_FORMAT = "%Y%m%d-%H%M%S"


@dataclass
class RunRecord:
    """What ``run.json`` says about a run folder."""

    experiment: str
    stage: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    started: str


def new_run_dir(cfg: DictConfig, run_id: str | None) -> Path:
    """A fresh folder for a run of ``cfg``, named by when it started and the MLflow run id's first chars."""
    short_id = (run_id or uuid.uuid4().hex)[:SHORT_ID_CHARS]
    stamp = datetime.now().strftime(TIME_FORMAT)
    path = Path(cfg.paths.output_dir) / cfg.run.experiment / cfg.run.choices.stage / f"{stamp}_{short_id}"
    path.mkdir(parents=True, exist_ok=False)
    return path.resolve()


def run_dir_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run folder a ``<run>/checkpoints/*.ckpt`` belongs to, if it has a ``run.json``."""
    folder = Path(checkpoint).resolve().parent.parent
    return folder if (folder / RUN_FILE).is_file() else None


def write_record(run_dir: Path, record: RunRecord) -> Path:
    path = run_dir / RUN_FILE
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return path


def read_record(run_dir: Path) -> RunRecord:
    path = run_dir / RUN_FILE
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot read the run record {path}: {error}") from error


def started_now() -> str:
    return datetime.now().isoformat(timespec="seconds")
