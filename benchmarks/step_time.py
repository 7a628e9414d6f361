"""Training-step cost of DeSa2VA's decoupling, side by side with the Sa2VA control, interleaved in one run.

Both variants train stage 2 on the same fixed batches of the synthetic benchmark, both with the motion prompt
(the project's addition, on in both arms). Steps alternate (control, DeSa2VA, control, ...), so load from
other jobs falls on both alike; the figure that matters is the ratio of the median step times (decoupled /
control), which holds across machines better than seconds do. ``--profile`` adds torch.profiler's view of a
few training steps and validation batches of each arm: the wall time of each part of the model and the
costliest operators.

    .venv/bin/python benchmarks/step_time.py [--data-dir data/shapes] [--steps 20] [--profile]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from lightning_desa2va.build import build_components
from lightning_desa2va.config import compose_config

VARIANTS = {
    "Sa2VA control (decoupler=none, fusion=visual, one decode a frame)": ["experiment=sa2va_baseline"],
    "DeSa2VA (linear_ortho decoupler, dynamic fusion, text + visual decodes)": ["experiment=desa2va_tiny"],
}
WARMUP_STEPS = 2
PROFILED_STEPS = 3
TOP_OPERATORS = 20
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
PROFILED_MODULES = (
    "vlm",
    "sam.image_encoder",
    "sam.sam_mask_decoder",
    "decoupler",
    "text_prompt",
    "visual_prompt",
    "fusion",
    "motion_prompt",
)
"""Parts of the model whose forward passes the profile times (``model.<name>``)."""
PROFILED_METHODS = ("encode_frames", "sam.decode_prompts", "sam.upsample")
"""Model methods the profile times (where the model has them): SAM-2's image features, the mask decoder
calls, the upsampling of the masks."""
PHASE_PREFIX = "step/"
PART_PREFIX = "model."


def build_step(
    overrides: list[str], data_dir: Path, steps: int, batch_size: int, cache_frames: int
) -> Callable[[int], None]:
    """A training step (forward, loss, backward, optimizer) of the variant on its ``index``-th fixed batch;
    ``step.evaluate()`` scores one validation batch as validation does (every frame of a video, each
    of its expressions). With ``cache_frames`` > 0 the frozen image encoder keeps every fixed batch's
    frames, encoded before any step is timed (a long run's steady state, where nearly every frame is kept)."""
    cfg = compose_config(
        [
            *overrides,
            "stage=decoupled_finetune",
            f"paths.data_dir={data_dir}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            f"model.sam2.cache_frames={cache_frames}",
        ],
        EXPERIMENTS_DIR,
    )
    parts = build_components(cfg)
    stage = parts.stage
    batches = iter(parts.datamodule.train_dataloader())
    fixed = [next(batches) for _ in range(steps)]
    optimizer = stage.configure_optimizers()
    if cache_frames:
        with torch.no_grad():
            for batch in fixed:
                stage.model.encode_frames(batch["frames"])

    def step(index: int) -> None:
        batch = fixed[index % len(fixed)]
        with record_function(f"{PHASE_PREFIX}forward + loss"):
            loss = stage.compute_losses(batch)[1].total
        optimizer.zero_grad()
        with record_function(f"{PHASE_PREFIX}backward"):
            loss.backward()
        with record_function(f"{PHASE_PREFIX}optimizer"):
            optimizer.step()

    val_batch = next(iter(parts.datamodule.val_dataloader()))

    @torch.no_grad()
    def evaluate() -> None:
        stage.eval()
        with record_function(f"{PHASE_PREFIX}validation batch"):
            stage.evaluation_logits(val_batch, "val")
        stage.train()

    step.model = stage.model  # type: ignore[attr-defined]
    step.evaluate = evaluate  # type: ignore[attr-defined]
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu`` (the process's CPU time) is robust to other jobs' load when torch runs one thread
(``--threads 1``); with more threads it also counts threads waiting for each other."""


def interleaved_times(
    arms: list[Callable[[int], None]], steps: int, clock: Callable[[], float]
) -> list[list[float]]:
    """Seconds of each arm's steps, run in turn (A B A B ...) after ``WARMUP_STEPS`` untimed rounds."""
    times: list[list[float]] = [[] for _ in arms]
    for index in range(WARMUP_STEPS + steps):
        for arm, step in enumerate(arms):
            start = clock()
            step(index)
            if index >= WARMUP_STEPS:
                times[arm].append(clock() - start)
    return times


@contextmanager
def labelled_parts(model: nn.Module) -> Iterator[None]:
    """Every forward of ``PROFILED_MODULES`` and call of ``PROFILED_METHODS`` as a labelled profiler range."""
    handles = []
    for name in PROFILED_MODULES:
        module = model.get_submodule(name)
        ranges: list[Any] = []

        def enter(module: nn.Module, args: Any, name: str = name, ranges: list[Any] = ranges) -> None:
            ranges.append(record_function(f"{PART_PREFIX}{name}").__enter__())

        def leave(module: nn.Module, args: Any, output: Any, ranges: list[Any] = ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    originals = []
    for path in PROFILED_METHODS:
        owner_name, _, method = path.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        original = getattr(owner, method, None)
        if original is None:
            continue

        def timed(*args: Any, original: Callable = original, path: str = path, **kwargs: Any) -> Any:
            with record_function(f"{PART_PREFIX}{path}"):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        originals.append((owner, method))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, method in originals:
            delattr(owner, method)  # the instance attribute goes, the class's method shows again


def profile_table(name: str, step: Callable[[int], None], evaluation: bool = False) -> list[Table]:
    """Per step (training, or with ``evaluation`` a validation batch): the wall time of each phase and part
    of the model, and the costliest operators (self time)."""
    run = (lambda index: step.evaluate()) if evaluation else step  # type: ignore[attr-defined]
    run(0)  # warm-up
    with labelled_parts(step.model), profile(activities=[ProfilerActivity.CPU]) as prof:  # type: ignore[attr-defined]
        for index in range(PROFILED_STEPS):
            run(index)
    events = prof.key_averages()
    what = "validation batch" if evaluation else "training step"
    parts = Table(title=f"{name}: wall time per {what} (profiled, {PROFILED_STEPS} of them)")
    for column in ("phase or part", "ms / step", "calls / step"):
        parts.add_column(column)
    labelled = [e for e in events if e.key.startswith((PHASE_PREFIX, PART_PREFIX))]
    for event in sorted(labelled, key=lambda e: (not e.key.startswith(PHASE_PREFIX), -e.cpu_time_total)):
        calls = event.count / PROFILED_STEPS
        parts.add_row(event.key, f"{event.cpu_time_total / 1e3 / PROFILED_STEPS:.1f}", f"{calls:g}")
    operators = Table(title=f"{name}: top operators by self time per {what}")
    for column in ("operator", "self ms / step", "calls / step"):
        operators.add_column(column)
    ranked = sorted(
        (e for e in events if not e.key.startswith((PHASE_PREFIX, PART_PREFIX))),
        key=lambda e: -e.self_cpu_time_total,
    )
    for event in ranked[:TOP_OPERATORS]:
        self_ms = event.self_cpu_time_total / 1e3 / PROFILED_STEPS
        operators.add_row(event.key, f"{self_ms:.1f}", f"{event.count / PROFILED_STEPS:g}")
    return [parts, operators]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/shapes"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each arm (interleaved)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also profile a few steps of each arm")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what a step's time is")
    parser.add_argument(
        "--cache-frames",
        type=int,
        default=0,
        help="frames the frozen image encoder keeps (model.sam2.cache_frames); 0: every step encodes its "
        "frames, the model's own cost",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        arms = {
            name: build_step(overrides, args.data_dir, args.steps, args.batch_size, args.cache_frames)
            for name, overrides in VARIANTS.items()
        }
    except FileNotFoundError as error:
        parser.exit(2, f"step_time: {error} (`desa2va demo` writes the synthetic shards there)\n")
    console = Console()
    if args.profile:
        for name, step in arms.items():
            for evaluation in (False, True):
                for table in profile_table(name, step, evaluation):
                    console.print(table)
    times = dict(
        zip(arms, interleaved_times(list(arms.values()), args.steps, CLOCKS[args.clock]), strict=True)
    )
    control, decoupled = times.values()
    pair_ratios = [d / c for c, d in zip(control, decoupled, strict=True)]
    table = Table(
        title=f"stage-2 training step, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps each interleaved, {args.clock} time, image encoder cache {args.cache_frames}"
    )
    for column in ("variant", "median s / step", "quartiles (spread)", "ratio of medians"):
        table.add_column(column)
    baseline = statistics.median(control)
    for name, seconds in times.items():
        low, median, high = quartiles(seconds)
        table.add_row(name, f"{median:.3f}", f"{low:.3f} - {high:.3f}", f"{median / baseline:.2f}")
    console.print(table)
    low, median, high = quartiles(pair_ratios)
    console.print(
        f"ratio DeSa2VA / control: {statistics.median(decoupled) / baseline:.2f} (medians); "
        f"per interleaved pair median {median:.2f}, quartiles {low:.2f} - {high:.2f}"
    )


if __name__ == "__main__":
    main()
