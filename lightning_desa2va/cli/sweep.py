"""``desa2va sweep``: an Optuna study (or an ablation grid) over the pipeline, described by a sweep spec."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_desa2va.cli.help import add_command
from lightning_desa2va.console import print_table

UI_HINT = "Compare the trials with `make ui`: open the study's experiment, runs nested under its parent run."


def register(commands: argparse._SubParsersAction) -> None:
    sweep = add_command(
        commands,
        "sweep",
        "run (or resume) an Optuna study over the pipeline from a sweep spec; ablations print their table",
        "desa2va sweep sweeps/ablate_decoupler.yaml --profile quick --workers 2",
        takes_overrides=True,
        positionals=[("spec", "a sweep spec (sweeps/*.yaml)")],
    )
    sweep.add_argument("--profile", default="default", help="a profile of the spec (e.g. quick)")
    sweep.add_argument("--workers", type=int, default=1, help="worker processes sharing the study's storage")
    sweep.set_defaults(run=_sweep)


def _sweep(args: argparse.Namespace) -> None:
    from lightning_desa2va.tuning.spec import SweepSpecError, load_spec
    from lightning_desa2va.tuning.sweep import nothing_completed, run_sweep, summary_lines

    if args.workers < 1:
        raise SweepSpecError(f"--workers must be at least 1, got {args.workers}")
    spec = load_spec(Path(args.spec), args.profile)
    result = run_sweep(spec, args.overrides, args.experiments_dir, args.workers)
    lines = [*summary_lines(result), UI_HINT]
    if result.report is None:
        for line in lines:
            print(line)
    else:
        files = ", ".join(map(str, result.report.files))
        print_table(result.report.table, [f"chart and table: {files}", *lines])
    failure = nothing_completed(result)
    if failure:
        sys.exit(f"desa2va: error: {failure}")
