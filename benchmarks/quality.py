"""The Sa2VA control vs the DeSa2VA default, each with the flow-match motion prompt on and off, 3 seeds each
and the same total training steps, scored on the test split.

A thin script over the ablation machinery: the grid study ``sweeps/quality.yaml`` (experiment × motion_prompt
× seed), so an interrupted run resumes where it stopped. Prints mean ± std J&F overall / static / motion /
mixed with J&F's 95% bootstrap interval and its paired difference from the Sa2VA control, QA accuracy, the
diagnostics and the wall time per arm, and logs the table and chart to MLflow.

    python benchmarks/quality.py --profile quick     # 2 seeds, 60 steps an arm, small data: minutes
    python benchmarks/quality.py                     # 3 seeds, 2,000 steps an arm: hours on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lightning_desa2va.console import print_table, quiet_third_party_output
from lightning_desa2va.tuning.spec import load_spec
from lightning_desa2va.tuning.sweep import nothing_completed, run_sweep, summary_lines

SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "quality.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=("quick", "default"), default="default")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the study")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every arm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party_output()
    result = run_sweep(load_spec(SPEC, args.profile), args.overrides, workers=args.workers)
    assert result.report is not None  # quality.yaml is an ablation grid
    print_table(result.report.table, [*result.report.notes, *summary_lines(result)])
    failure = nothing_completed(result)
    if failure:
        sys.exit(failure)


if __name__ == "__main__":
    main()
