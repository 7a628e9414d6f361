"""Does a TPE + Hyperband study find a loss-weight configuration as good as an equal-space grid's best while
training far fewer steps? Target: within 1 J&F point of the grid's best, at most 40% of its steps.

Runs ``sweeps/loss_weights.yaml`` (TPE + Hyperband over loss.w_t, loss.w_v, loss.w_orth; ``--budget`` trials)
and ``sweeps/loss_weights_grid.yaml`` (3 values a weight over the same ranges, every point to the end), both
resumable studies, then prints each one's best validation J&F, the training steps each spent (a pruned trial
counts the steps it trained) and the ratios.

    python benchmarks/sweep_efficiency.py --profile quick --budget 6     # minutes: a smoke run
    python benchmarks/sweep_efficiency.py --budget 9                      # the measurement: hours on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lightning_desa2va.console import TextTable, print_table, quiet_third_party_output
from lightning_desa2va.tuning.objective import STEPS_ATTR
from lightning_desa2va.tuning.spec import ConfirmSpec, load_spec, number_of_trials
from lightning_desa2va.tuning.sweep import run_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SEARCH, GRID = SWEEPS / "loss_weights.yaml", SWEEPS / "loss_weights_grid.yaml"
TARGET_GAP = 0.01  # 1 J&F point
TARGET_STEP_SHARE = 0.4


def best_and_steps(study: optuna.Study) -> tuple[float, int]:
    complete = [trial for trial in study.get_trials() if trial.state == TrialState.COMPLETE]
    steps = sum(trial.user_attrs.get(STEPS_ATTR, 0) for trial in study.get_trials())
    return (study.best_value if complete else float("nan")), steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=("quick", "default"), default="default")
    parser.add_argument("--budget", type=int, default=None, help="TPE trials (default: the spec's n_trials)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing each study")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial of both studies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party_output()
    # Both studies are compared on what they choose on (val): neither is confirmed on test here.
    no_confirmation = ConfirmSpec(top=0)
    search = dataclasses.replace(load_spec(SEARCH, args.profile), confirm=no_confirmation)
    if args.budget is not None:
        search = dataclasses.replace(search, n_trials=args.budget, name=f"{search.name}-budget{args.budget}")
    found, spent = best_and_steps(run_sweep(search, args.overrides, workers=args.workers).study)
    grid = dataclasses.replace(load_spec(GRID, args.profile), confirm=no_confirmation)
    grid_best, grid_steps = best_and_steps(run_sweep(grid, args.overrides, workers=args.workers).study)
    share = spent / grid_steps if grid_steps else float("nan")
    gap = grid_best - found
    table = TextTable(
        f"TPE + Hyperband vs the equal-space grid over the loss weights ({args.profile} profile, val J&F)",
        ["study", "best val J&F", "training steps"],
    )
    table.add_row(f"TPE + Hyperband ({search.n_trials} trials)", f"{found:.4f}", str(spent))
    table.add_row(f"grid ({number_of_trials(grid)} points)", f"{grid_best:.4f}", str(grid_steps))
    verdict = "met" if gap <= TARGET_GAP and share <= TARGET_STEP_SHARE else "not met"
    print_table(
        table,
        [
            f"J&F gap to the grid's best: {100 * gap:+.2f} points (target <= {100 * TARGET_GAP:.0f})",
            f"steps: {share:.1%} of the grid's (target <= {TARGET_STEP_SHARE:.0%}); target {verdict}",
        ],
    )


if __name__ == "__main__":
    main()
