"""What Lightning and the project's stage cost on top of the model: the same tiny stage-2 model and batches
trained through the project's LightningModule + Trainer (its configured callbacks, logging, NaN guard and
diagnostics) and through a plain PyTorch loop written here (forward, the same losses, backward, clip, step),
interleaved block by block in one run; it prints the median step time of each and their ratio.

    .venv/bin/python benchmarks/overhead.py [--data-dir data/shapes] [--blocks 6] [--steps 5]

Each Lightning block is one ``fit``; its steps are timed from one ``on_train_batch_start`` to the next, so the
fit's own start and end (not a per-step cost) stay out of the figure, while fetching, the batch transfer,
every hook, the step and the logging are in it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from lightning_desa2va.build import build_components
from lightning_desa2va.config import compose_config
from lightning_desa2va.training import build_trainer

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
TARGET_RATIO = 1.05


class StepClock(pl.Callback):
    """Wall time from one training batch's start to the next one's (the last step: to the train end)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.starts, self.starts[1:], strict=False)]


def lightning_block(cfg: Any, stage: pl.LightningModule, batches: list[dict]) -> list[float]:
    """Step times of one fit of the project's stage over ``batches`` with the configured trainer."""
    clock = StepClock()
    trainer = build_trainer(cfg, logger=False, callbacks=[clock])
    trainer.fit_loop.epoch_loop.max_steps = len(batches)
    loader = DataLoader(batches, batch_size=None)
    trainer.fit(stage, train_dataloaders=loader)
    return clock.steps()[1:]  # the first includes the fit's start


def plain_block(
    stage: Any, optimizer: torch.optim.Optimizer, batches: list[dict], clip: float
) -> list[float]:
    """Step times of a plain loop: the stage's losses, backward, gradient clipping and the optimizer step."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = stage.compute_losses(batch)[1].total
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/shapes"))
    parser.add_argument("--blocks", type=int, default=6, help="blocks of each path, interleaved")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a block (one more is run)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    overrides = [
        "experiment=desa2va_tiny",
        "stage=decoupled_finetune",
        f"paths.data_dir={args.data_dir}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        "+trainer.limit_val_batches=0",
        "trainer.callbacks.progress=null",
    ]
    root = tempfile.TemporaryDirectory()  # the trainer's end-of-fit checkpoint goes there
    try:
        cfg = compose_config([*overrides, f"paths.output_dir={root.name}"], EXPERIMENTS_DIR)
        parts = build_components(cfg)
        stream = iter(parts.datamodule.train_dataloader())
        batches = [next(stream) for _ in range(args.steps + 1)]
    except FileNotFoundError as error:
        parser.exit(2, f"overhead: {error} (`desa2va demo` writes the synthetic shards there)\n")
    optimizer = parts.stage.configure_optimizers()
    times: dict[str, list[float]] = {"Lightning (project stage + Trainer)": [], "plain PyTorch loop": []}
    with root:
        for _ in range(args.blocks):
            times["Lightning (project stage + Trainer)"] += lightning_block(cfg, parts.stage, batches)
            times["plain PyTorch loop"] += plain_block(
                parts.stage, optimizer, batches, cfg.trainer.gradient_clip_val
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    lightning, plain = medians.values()
    table = Table(
        title=f"stage-2 step, batch {args.batch_size}, {torch.get_num_threads()} threads, interleaved"
    )
    for column in ("path", "steps", "median s / step", "spread (IQR)"):
        table.add_column(column)
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4)
        table.add_row(name, str(len(values)), f"{medians[name]:.4f}", f"{quartiles[2] - quartiles[0]:.4f}")
    console = Console()
    console.print(table)
    verdict = "meets" if lightning / plain <= TARGET_RATIO else "misses"
    console.print(
        f"ratio Lightning / plain: {lightning / plain:.3f} ({verdict} the target <= {TARGET_RATIO})"
    )


if __name__ == "__main__":
    main()
