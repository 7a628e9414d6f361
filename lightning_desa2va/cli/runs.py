"""``desa2va train``, ``eval`` and ``demo``: train one stage, score a checkpoint, run the full pipeline.

The jobs import Lightning, transformers and SAM-2 (~15 s on 2 cores), so each handler imports what it
needs when it runs: ``desa2va --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lightning_desa2va.cli.help import add_command
from lightning_desa2va.config import compose_config
from lightning_desa2va.report import print_metrics, print_summary

if TYPE_CHECKING:
    from lightning_desa2va.training import StageRun

EXPERIMENT_PREFIX = "experiment="
DEMO_EXPERIMENT = f"{EXPERIMENT_PREFIX}desa2va_tiny"
UNION = "union of objects"
UI_HINT = "Browse the runs with `make ui` (MLflow UI on http://127.0.0.1:5000)."


def register(commands: argparse._SubParsersAction) -> None:
    train = add_command(
        commands,
        "train",
        "train one stage and score it on val beside the union-of-objects baseline",
        "desa2va train stage=decoupled_finetune stage.init_from=outputs/.../last.ckpt resume=auto",
        takes_overrides=True,
    )
    train.set_defaults(run=_train)

    evaluate = add_command(
        commands,
        "eval",
        "score a stage checkpoint on val or test beside the union-of-objects baseline",
        "desa2va eval outputs/.../checkpoints/last.ckpt stage=decoupled_finetune --split test",
        takes_overrides=True,
        positionals=[("checkpoint", "a stage's Lightning checkpoint (.ckpt)")],
    )
    evaluate.add_argument("--split", choices=("val", "test"), default="val")
    evaluate.set_defaults(run=_evaluate)

    demo = add_command(
        commands,
        "demo",
        "the main job: synthetic shards if missing, every stage of pipeline.stages, val and test scores",
        "desa2va demo experiment=sa2va_baseline resume=auto   (the Sa2VA control; continues a stopped one)",
        takes_overrides=True,
    )
    demo.set_defaults(run=_demo)


def _train(args: argparse.Namespace) -> None:
    from lightning_desa2va.resume import requested_resume
    from lightning_desa2va.training import train_stage

    cfg = compose_config(args.overrides, args.experiments_dir)
    print_runs([train_stage(cfg, resume=requested_resume(cfg))])


def _evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lightning_desa2va.pipeline import evaluate_checkpoint
    from lightning_desa2va.stages.checkpoints import export_overrides

    # an export folder brings the overrides that build its model
    cfg = compose_config([*export_overrides(Path(args.checkpoint)), *args.overrides], args.experiments_dir)
    scores, baseline = evaluate_checkpoint(cfg, Path(args.checkpoint), args.split)
    print_summary(f"{args.checkpoint} on {args.split}", {"model": scores, UNION: baseline})


def _demo(args: argparse.Namespace) -> None:
    from lightning_desa2va.pipeline import run_pipeline

    chosen = any(override.startswith(EXPERIMENT_PREFIX) for override in args.overrides)
    overrides = args.overrides if chosen else [DEMO_EXPERIMENT, *args.overrides]
    print_runs(run_pipeline(overrides, args.experiments_dir))


def print_runs(runs: list[StageRun]) -> None:
    """The val table of every stage (and the test table of those scored on test), then where the runs are
    and what the data pipelines skipped; printed by rank 0 alone in distributed training."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    footer = [f"{run.label}: MLflow run {run.run_id}, outputs in {run.output_dir}" for run in runs]
    footer += [skipped_line(run) for run in runs]
    footer.append(UI_HINT)
    if not all("JF" in run.metrics for run in runs):
        print_metrics("metrics on val", {run.label: run.metrics for run in runs})
        return
    tested = [run for run in runs if run.test_metrics]
    val_rows = {run.label: run.metrics for run in runs}
    val_rows[UNION] = runs[-1].baseline
    print_summary("J&F on val", val_rows, [] if tested else footer)
    if tested:
        test_rows = {run.label: run.test_metrics for run in tested}
        test_rows[UNION] = tested[-1].test_baseline
        print_summary("J&F on test", test_rows, footer)


def skipped_line(run: StageRun) -> str:
    """How many samples the run skipped and why (``data.on_error=skip`` counts them by reason)."""
    counts = {reason: count for reason, count in run.skipped.items() if count}
    if not counts:
        return f"{run.label}: no sample skipped"
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    return f"{run.label}: skipped {sum(counts.values())} samples ({reasons}; data/skipped/* in MLflow)"
