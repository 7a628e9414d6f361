"""Where the demo's wall time goes: `desa2va demo` run once, timed phase by phase.

Phases: writing the synthetic shards, then per stage its training steps, its validations (during and after
training), its test, the union-of-objects baseline, and the rest (building the model, MLflow, checkpoints).
The shards go to a fresh folder, so data generation counts as it does on a fresh clone; the runs go to a
temporary output folder and MLflow store. The machine's load average is printed beside the times: on a
shared machine the figures are only as good as the quiet they were measured in.

    .venv/bin/python benchmarks/demo_time.py [--keep DIR] [overrides ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from lightning_desa2va import pipeline, training
from lightning_desa2va.cli.runs import print_runs
from lightning_desa2va.config import compose_config

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
DEMO_EXPERIMENT = "experiment=desa2va_tiny"
Phases = dict[str, float]


@contextmanager
def timed(phases: Phases, name: str) -> Iterator[None]:
    """Add the block's wall time to ``phases[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] += time.perf_counter() - start


class PhaseTimer(Callback):
    """Wall time of a stage's training (without the validations inside it), validations and test."""

    def __init__(self, phases: Phases, stage: str) -> None:
        self.phases = phases
        self.stage = stage
        self.started: dict[str, float] = {}

    def _start(self, phase: str) -> None:
        self.started[phase] = time.perf_counter()

    def _stop(self, phase: str) -> float:
        elapsed = time.perf_counter() - self.started.pop(phase)
        self.phases[f"{self.stage} {phase}"] += elapsed
        return elapsed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("train")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop("train")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("val")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = self._stop("val")
        if trainer.state.fn == "fit":  # validation inside fit is not training time
            self.phases[f"{self.stage} train"] -= elapsed

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop("test")


def timed_baseline(phases: Phases, score: Callable[..., Any]) -> Callable[..., Any]:
    """The union-baseline scoring, its wall time added to ``phases``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timed(phases, "union baseline"):
            return score(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=Path, help="write shards and runs here instead of a temporary folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as `desa2va demo` takes them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = [DEMO_EXPERIMENT, *args.overrides]
    phases: Phases = defaultdict(float)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        overrides += [
            f"paths.data_dir={root / 'data'}",
            f"paths.output_dir={root / 'outputs'}",
            f"logger.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ]
        start = time.perf_counter()
        with timed(phases, "data"):
            pipeline.ensure_synthetic_shards(compose_config(overrides, EXPERIMENTS_DIR))
        training.score_union_baseline = timed_baseline(phases, training.score_union_baseline)
        runs = pipeline.run_pipeline(
            overrides,
            EXPERIMENTS_DIR,
            stage_callbacks=lambda cfg: [PhaseTimer(phases, cfg.run.choices.stage)],
        )
        total = time.perf_counter() - start
    print_runs(runs)
    phases["other (build, MLflow, checkpoints)"] = total - sum(phases.values())
    table = Table(title=f"`desa2va demo {' '.join(args.overrides)}`: wall time by phase")
    for column in ("phase", "s", "share"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, seconds in phases.items():
        table.add_row(name, f"{seconds:.1f}", f"{seconds / total:.0%}")
    table.add_row("total", f"{total:.1f}", "100%")
    console = Console()
    console.print(table)
    load_after = os.getloadavg()
    console.print(
        f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
