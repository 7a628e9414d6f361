"""Which run to continue, checked before anything is reopened.

``resume_from=CKPT`` names a run by one of its checkpoints; ``resume=auto`` looks for the newest unfinished
run of the same experiment and stage (one whose process died or was stopped: nobody holds its lock) that was
composed the same way. Before a run is continued, its checkpoint must load safely (``weights_only=True``,
whatever the environment says), the composed config must equal the run's ``config.yaml`` and the tracking
URI the one in its ``run.json``. A refused resume raises one line naming the difference and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_desa2va.checkpointing import read_checkpoint
from lightning_desa2va.errors import CheckpointError, ResumeError
from lightning_desa2va.runs import (
    FINISHED,
    RunRecord,
    is_alive,
    last_checkpoint,
    newest_first,
    read_record,
    run_dir_of_checkpoint,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
NOT_COMPARED = ("resume", "resume_from", "run.overrides")
"""Keys that say how a run was started, not what it computes (the overrides' order, ``resume=auto``)."""
DIFFERENCES_SHOWN = 3


@dataclass
class Resume:
    """A run to continue: its folder and record, and the checkpoint it continues from (``None``: the run
    died before its first checkpoint, so it starts again from step 0 in the same folder and MLflow run)."""

    run_dir: Path
    record: RunRecord
    checkpoint: Path | None
    step: int = 0
    """The optimizer step the checkpoint holds (0: from the start)."""


def requested_resume(cfg: DictConfig) -> Resume | None:
    """The run ``cfg`` asks to continue (``resume_from`` or ``resume=auto``), checked; ``None``: a new run."""
    if cfg.resume_from:
        return checkpoint_resume(cfg, Path(cfg.resume_from))
    if cfg.resume:
        return newest_unfinished(cfg)
    return None


def checkpoint_resume(cfg: DictConfig, checkpoint: Path) -> Resume | None:
    """Continue the run ``checkpoint`` belongs to (refused in one line if it may not be); a checkpoint outside
    any run folder starts a new run from its weights and training state."""
    read_checkpoint(checkpoint)
    run_dir = run_dir_of_checkpoint(checkpoint)
    if run_dir is None:
        log.info("%s is in no run folder: a new run continues its training", checkpoint)
        return None
    if is_alive(run_dir) and not other_rank():
        raise ResumeError(f"cannot resume {run_dir}: another process is running it")
    return checked(cfg, run_dir, Path(checkpoint))


def other_rank() -> bool:
    """Whether this process is a rank other than 0 of a distributed run (from the launcher's environment):
    it follows rank 0, which holds the run's lock by the time this rank looks."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank != 0


def newest_unfinished(cfg: DictConfig) -> Resume | None:
    """The newest run of the experiment and stage that did not finish and was composed like ``cfg`` (runs
    composed otherwise are passed over, saying why), or ``None``."""
    folder = Path(cfg.paths.output_dir) / cfg.run.experiment / cfg.run.choices.stage
    for run_dir in newest_first(folder, "run.json"):
        resume = unfinished_run(cfg, run_dir)
        if resume is not None:
            log.info("resume=auto: continuing %s from %s", run_dir, resume.checkpoint or "step 0")
            return resume
    log.info("resume=auto: no unfinished run of %s composed the same; starting one", folder)
    return None


def unfinished_run(cfg: DictConfig, run_dir: Path) -> Resume | None:
    """``run_dir`` as a run to continue under ``cfg``, or ``None`` when it finished, is running or was
    composed otherwise (logged); a damaged checkpoint is an error (it would be silently lost otherwise)."""
    record = read_record(run_dir)
    if record.status == FINISHED or (is_alive(run_dir) and not other_rank()):
        return None
    try:
        return checked(cfg, run_dir, last_checkpoint(run_dir))
    except ResumeError as error:
        log.info("resume=auto: passing over %s", error)
        return None


def checked(cfg: DictConfig, run_dir: Path, checkpoint: Path | None) -> Resume:
    """``run_dir`` with ``checkpoint`` as a :class:`Resume`, after the checks (one-line errors)."""
    record = read_record(run_dir)
    step = int(read_checkpoint(checkpoint).get("global_step", 0)) if checkpoint is not None else 0
    differences = config_differences(run_dir, cfg)
    if differences:
        raise ResumeError(f"cannot resume {run_dir}: it was composed differently ({differences})")
    tracking_uri = cfg.logger.tracking_uri if cfg.logger is not None else None
    if record.tracking_uri != tracking_uri:
        raise ResumeError(
            f"cannot resume {run_dir}: its MLflow runs are in {record.tracking_uri}, this run would log to "
            f"{tracking_uri} (set logger.tracking_uri or MLFLOW_TRACKING_URI to the former)"
        )
    return Resume(run_dir, record, checkpoint, step)


def config_differences(run_dir: Path, cfg: DictConfig) -> str:
    """The keys whose values differ between a run's saved config and ``cfg`` (``saved → now``), the first few
    on one line; empty when they agree."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no {CONFIG_FILE} to check the config against")
    saved = dict(_leaves(OmegaConf.to_container(OmegaConf.load(path), resolve=True), ""))
    now = dict(_leaves(OmegaConf.to_container(cfg, resolve=True), ""))
    keys = sorted(
        key
        for key in saved.keys() | now.keys()
        if saved.get(key) != now.get(key) and not key.startswith(NOT_COMPARED)
    )
    shown = [f"{key}: {saved.get(key)!r} → {now.get(key)!r}" for key in keys[:DIFFERENCES_SHOWN]]
    more = f"; {len(keys) - DIFFERENCES_SHOWN} more" if len(keys) > DIFFERENCES_SHOWN else ""
    return "; ".join(shown) + more


def _leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, node
