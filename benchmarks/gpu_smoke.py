"""The desa2va_1b recipe end to end on random weights: a few training steps, an evaluation and a predict, with
step time, samples/s and peak memory, through the commands' own code.

    .venv/bin/python benchmarks/gpu_smoke.py            # on a GPU: the desa2va_1b shape, bf16
    .venv/bin/python benchmarks/gpu_smoke.py --small    # on this machine: the small shape on the CPU

The model is ``experiment=desa2va_1b`` on random weights of its shape written in the real formats
(benchmarks/real_shapes.py: InternVL3-1B-hf + SAM-2.1 Hiera-L; ``--small``: the same classes CPU-sized) and
synthetic shards at SAM-2's size. Stage 2 trains with ``train_stage`` (Lightning, the recipe's trainer:
bf16-mixed on the GPU, gradient accumulation 4, LoRA r=128, gradient checkpointing), then
``evaluate_checkpoint`` scores its checkpoint on val (Sa2VA-i) and ``predict`` segments a video folder at its
own size. Times and scores of random weights say nothing about quality; the point is that the recipe runs on
the device, how fast, and in how much memory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from real_shapes import MIB, REAL_1B, SMALL, PeakMemory, Shape, device_overrides, write_weights
from rich.console import Console
from rich.table import Table

from lightning_desa2va.config import compose_config
from lightning_desa2va.console import quiet_third_party_output
from lightning_desa2va.pipeline import ensure_synthetic_shards, evaluate_checkpoint, train_stage
from lightning_desa2va.predict import predict, predict_config

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
VIDEO = {"small": (16, (180, 320)), "1b": (48, (720, 1280))}
"""Frames and size of the video predict segments."""
FPS = 10.0


class StepTimer(pl.Callback):
    """Wall time of every optimizer step (the batches it accumulates, forward, backward and update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = time.perf_counter()
        self._step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self._step:  # an optimizer step completed with this batch
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.seconds.append(now - self._start)
            self._start, self._step = now, trainer.global_step


def write_video(folder: Path, frames: int, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(frames):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.jpg")
    return folder


@dataclass
class Phase:
    """One phase's wall time, what it did per second, and its peak memory."""

    name: str
    seconds: float
    throughput: str
    memory: PeakMemory


def timed(name: str, device: str, work: Callable[[], Any], throughput: Callable[[Any, float], str]) -> Phase:
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
    return Phase(name, seconds, throughput(result, seconds), memory)


def run(shape: Shape, name: str, device: str, steps: int, root: Path) -> list[Phase]:
    """Train, evaluate and predict the recipe on the shape's random weights under ``root``."""
    overrides = [
        *write_weights(shape, root / "weights"),
        *device_overrides(device, real=True),
        f"paths.data_dir={root / 'data'}",
        f"paths.output_dir={root / 'outputs'}",
        f"logger.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"+synthetic.generator.image_size={shape.sam2_image_size}",
        "synthetic.videos={train:8,val:2,test:2}",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
    ]
    schedule = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={4 * steps}",
        f"trainer.callbacks.0.every_n_train_steps={steps}",
    ]
    cfg = compose_config(["stage=decoupled_finetune", *overrides, *schedule], EXPERIMENTS_DIR)
    ensure_synthetic_shards(cfg)
    timer = StepTimer()
    clips = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches

    def per_step(_: Any, __: float) -> str:
        step = statistics.median(timer.seconds[1:] or timer.seconds)  # the first step also warms up
        return f"{step:.2f} s/step (median), {clips / step:.2f} samples/s"

    training = timed(f"train {steps} steps ({clips} clips a step)", device,
                     lambda: train_stage(cfg, callbacks=[timer]), per_step)  # fmt: skip
    checkpoint = Path(next((root / "outputs").rglob("last.ckpt")))
    evaluation = timed("evaluate val (Sa2VA-i)", device, lambda: evaluate_checkpoint(cfg, checkpoint, "val"),
                       lambda scores, _: f"J&F {scores[0]['JF']:.3f} (random weights)")  # fmt: skip
    frames, size = VIDEO[name]
    video = write_video(root / "video", frames, size)
    predict_cfg = predict_config(overrides, checkpoint, EXPERIMENTS_DIR)
    prediction = timed(
        f"predict {frames} frames at {size[0]}x{size[1]}",
        device,
        lambda: predict(predict_cfg, video, "the object moving left", checkpoint, root / "out", "gif", FPS),
        lambda result, seconds: f"{frames / seconds:.2f} frames/s, masks {tuple(result.masks.shape)}",
    )
    return [training, evaluation, prediction]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="the small shape on the CPU (this machine)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to train (4 batches each)")
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small on a CPU")
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_output()
    shape, name = (SMALL, "small") if args.small else (REAL_1B, "1b")
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):  # MLflow's artifacts land there
        phases = run(shape, name, device, args.steps, Path(scratch))
    where = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
    memory = "CUDA max allocated" if device == "cuda" else "resident set"
    table = Table(title=f"{shape.name} on {where}")
    for header in ("phase", "wall s", "throughput", f"peak memory ({memory})"):
        table.add_column(header, justify="left" if header == "phase" else "right")
    for phase in phases:
        table.add_row(
            phase.name, f"{phase.seconds:.1f}", phase.throughput, f"{phase.memory.peak / MIB:,.0f} MiB"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
