"""Training-step cost of DeSa2VA's decoupling, side by side with the Sa2VA control, in one run.

Both variants train stage 2 on the same fixed batches of the synthetic benchmark, both with the motion prompt
(the project's addition, on in both arms); the figure that matters is the ratio (decoupled / control), which
holds across machines better than seconds do.

    .venv/bin/python benchmarks/step_time.py [--data-dir data/shapes] [--steps 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lightning_desa2va.build import build_components
from lightning_desa2va.config import compose_config

VARIANTS = {
    "Sa2VA control (decoupler=none, fusion=visual, one decode a frame)": ["experiment=sa2va_baseline"],
    "DeSa2VA (linear_ortho decoupler, dynamic fusion, text + visual decodes)": ["experiment=desa2va_tiny"],
}
WARMUP_STEPS = 2
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def seconds_per_step(overrides: list[str], data_dir: Path, steps: int, batch_size: int) -> float:
    """Mean wall time of forward + backward + optimizer step over ``steps`` fixed batches."""
    cfg = compose_config(
        [
            *overrides,
            "stage=decoupled_finetune",
            f"paths.data_dir={data_dir}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
        ],
        EXPERIMENTS_DIR,
    )
    parts = build_components(cfg)
    batches = iter(parts.datamodule.train_dataloader())
    fixed = [next(batches) for _ in range(WARMUP_STEPS + steps)]
    optimizer = parts.stage.configure_optimizers()
    elapsed = 0.0
    for index, batch in enumerate(fixed):
        start = time.perf_counter()
        loss = parts.stage.compute_losses(batch)[1].total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index >= WARMUP_STEPS:
            elapsed += time.perf_counter() - start
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/shapes"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        results = {
            name: seconds_per_step(overrides, args.data_dir, args.steps, args.batch_size)
            for name, overrides in VARIANTS.items()
        }
    except FileNotFoundError as error:
        parser.exit(2, f"step_time: {error} (`desa2va demo` writes the synthetic shards there)\n")
    baseline = next(iter(results.values()))
    table = Table(title=f"stage-2 training step, batch {args.batch_size}, {torch.get_num_threads()} threads")
    for column in ("variant", "s / step", "ratio to baseline"):
        table.add_column(column)
    for name, seconds in results.items():
        table.add_row(name, f"{seconds:.3f}", f"{seconds / baseline:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
