"""What the sweep tests share: a tiny spec (one stage, a few steps, a handful of videos), the sweep command
as a process of its own (``cli_processes``), and the study read back from Optuna and MLflow."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from cli_processes import CommandProcess, start
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from lightning_desa2va.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
TINY = [
    "pipeline.stages=[decoupled_finetune]",
    "synthetic.videos={train:4,val:2,test:2}",
    "synthetic.videos_per_shard=4",
    "+synthetic.generator.num_frames=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "data.shuffle_buffer=4",
    "stage.num_overlays=0",
    "logger.log_model=false",
]

LONGER_TRIALS = [
    *(override for override in TINY if not override.startswith("trainer.")),
    "trainer.max_steps=12",
    "trainer.val_check_interval=12",
    "trainer.log_every_n_steps=1",
    "trainer.callbacks.checkpoint.every_n_train_steps=4",
]
"""Trials long enough to be stopped (or killed) in their training, checkpointed on the way (a retry continues
from the checkpoint)."""


def write_spec(folder: Path, name: str, space: dict, **fields: object) -> Path:
    """A sweep spec over the tiny run; fast heartbeats so a dead trial is found stale within seconds."""
    spec = {
        "name": name,
        "experiment": "desa2va_tiny",
        "overrides": TINY,
        "space": space,
        "sampler": "grid",
        "pruner": "none",
        "heartbeat_interval": 1,
        "grace_period": 3,
        **fields,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def start_sweep(
    root: Path, spec: Path, *options: str, tracking: str | None = None, log_name: str = "sweep.log"
) -> CommandProcess:
    """``desa2va sweep`` as its own process in ``root`` (its log in ``root/<log_name>``), logging to the
    local store in ``root`` unless ``tracking`` names another."""
    argv = ["--experiments-dir", str(EXPERIMENTS), "sweep", str(spec)]
    log = root / log_name
    store = f"logger.tracking_uri={tracking or tracking_uri(root)}"
    return start(root, main, [*argv, store, *options], stdout=log, stderr=log)


def run_sweep_process(root: Path, spec: Path, *options: str, timeout: float = 600) -> None:
    process = start_sweep(root, spec, *options)
    assert process.wait(timeout=timeout) == 0, (root / "sweep.log").read_text()[-3000:]


def load_study(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=f"sqlite:///{root / 'outputs/sweeps' / name / 'optuna.db'}"
    )


def mlflow_runs(root: Path, study: str, role: str | None = None) -> list[Run]:
    """The study's MLflow runs (every one, or those of a role: ``study``, ``trial``)."""
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [run for run in runs if role is None or run.data.tags.get("sweep.role") == role]
