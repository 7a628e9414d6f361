"""Data-parallel scaling: training samples a second of the tiny default's stage-2 model in one process and in
``--devices`` processes (``strategy=ddp``: gloo on CPUs, NCCL on GPUs), and their ratio (ideal: the number
of processes).

    .venv/bin/python benchmarks/ddp_scaling.py [--data-dir data/shapes] [--devices 2] [--accelerator cpu]
        [--steps 10] [--batch-size 4] [--threads 1]

Each configuration trains in a process of its own, through the project's stage, datamodule and Trainer
(validation, checkpoints and the progress bar off); Lightning starts the other ranks by running this script
again with the same arguments. Every rank trains ``--batch-size`` samples a step, so a step of N processes
trains N times the samples of one: samples a second count every rank's. The steps after ``WARMUP_STEPS`` are
timed on rank 0, from the start of the first to the end of the last (the ranks wait for each other at every
step's gradient all-reduce). On CPUs ``--threads`` pins each process's torch threads: with 1, N processes
use N cores where one process uses one.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
WARMUP_STEPS = 2


class TimedSteps(pl.Callback):
    """Wall seconds from the start of the first step after ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def overrides(args: argparse.Namespace, processes: int, output_dir: Path) -> list[str]:
    """The tiny stage 2 for ``processes`` processes: one process trains without a distributed strategy."""
    chosen = [
        "experiment=desa2va_tiny",
        "stage=decoupled_finetune",
        f"paths.data_dir={args.data_dir}",
        f"paths.output_dir={output_dir}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"trainer.max_steps={WARMUP_STEPS + args.steps}",
        "+trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.callbacks.progress=null",
        "trainer.callbacks.checkpoint=null",
        "+trainer.enable_checkpointing=false",
        f"trainer.devices={processes}",
        "strategy=auto" if processes == 1 else "strategy=ddp",
    ]
    if args.accelerator == "gpu":
        return [*chosen, "trainer=gpu"]
    return [*chosen, f"num_threads={args.threads}"]


def train_and_time(args: argparse.Namespace) -> None:
    """One configuration (this process is one of its ranks): rank 0 writes the timed steps' seconds."""
    from lightning_desa2va.build import build_components
    from lightning_desa2va.config import compose_config
    from lightning_desa2va.training import build_trainer

    cfg = compose_config(overrides(args, args.processes, args.result.parent), EXPERIMENTS_DIR)
    parts = build_components(cfg)
    clock = TimedSteps(WARMUP_STEPS)
    trainer = build_trainer(cfg, logger=False, callbacks=[clock])
    trainer.fit(parts.stage, datamodule=parts.datamodule)
    if trainer.is_global_zero:
        args.result.write_text(json.dumps({"seconds": clock.end - clock.start}))


def measured_seconds(processes: int) -> float:
    """Seconds of the timed steps of ``processes`` processes, trained by this script in its own process."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--processes",
            str(processes),
            "--result",
            str(result),
        ]
        subprocess.run(command, check=True)
        return float(json.loads(result.read_text())["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/shapes"))
    parser.add_argument("--devices", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples a step on each rank")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each process")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers of each process")
    parser.add_argument("--processes", type=int, help=argparse.SUPPRESS)  # one configuration's run
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.processes is not None:
        train_and_time(args)
        return
    if not any(args.data_dir.glob("train-*.tar")):
        parser.exit(2, f"ddp_scaling: no train shards in {args.data_dir} (`desa2va demo` writes them)\n")
    rates = {}
    for processes in (1, args.devices):
        rates[processes] = processes * args.batch_size * args.steps / measured_seconds(processes)
    threads = "" if args.accelerator == "gpu" else f", {args.threads} thread(s) each"
    table = Table(title=f"stage-2 training, batch {args.batch_size} a rank, {args.steps} steps{threads}")
    for column in ("processes", "samples / s", "s / step", "speed-up"):
        table.add_column(column)
    for processes, rate in rates.items():
        seconds = processes * args.batch_size / rate
        table.add_row(str(processes), f"{rate:.2f}", f"{seconds:.3f}", f"{rate / rates[1]:.2f}")
    Console().print(table)
    ratio = rates[args.devices] / rates[1]
    print(f"{args.devices} processes / 1: {ratio:.2f}x the samples a second (ideal {args.devices}x)")


if __name__ == "__main__":
    main()
