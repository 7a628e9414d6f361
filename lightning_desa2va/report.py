"""The summaries people read at the end of a run: J&F overall and per expression type beside the baseline,
and the foundations' metrics beside the shipped manifest. Printed through :mod:`lightning_desa2va.console`,
so they come out whole on any terminal and in log files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_desa2va.console import TextTable, print_table
from lightning_desa2va.data.schema import EXPRESSION_TYPES

if TYPE_CHECKING:
    from lightning_desa2va.foundations import Recipe

COLUMNS = {
    "JF": "J&F",
    **{f"JF/{kind}": f"J&F {kind}" for kind in EXPRESSION_TYPES},
    "J": "J",
    "F": "F",
    "mask_share/lookalike": "lookalike",
}
MISSING = "-"


def figure(scores: dict[str, float], name: str) -> str:
    return f"{scores[name]:.3f}" if name in scores else MISSING


def summary_table(title: str, rows: dict[str, dict[str, float]]) -> TextTable:
    """One row per model (or baseline), J&F overall / static / motion / mixed, J and F, and the share of the
    predicted masks on objects that look like a target but are not one (motion decides those)."""
    table = TextTable(title, ["model", *COLUMNS.values()])
    for name, scores in rows.items():
        table.add_row(name, *(figure(scores, column) for column in COLUMNS))
    return table


def print_summary(title: str, rows: dict[str, dict[str, float]], footer: Sequence[str] = ()) -> None:
    """The summary table and the lines after it (where the runs are)."""
    print_table(summary_table(title, rows), footer)


def print_metrics(title: str, rows: dict[str, dict[str, float]]) -> None:
    """Every metric of each run, for stages whose metrics are not J&F per type (foundation pretraining)."""
    table = TextTable(title, ["run", "metric", "value"])
    for name, scores in rows.items():
        for metric, value in sorted(scores.items()):
            table.add_row(name, metric, f"{value:.3f}")
    print_table(table)


def print_reproduction(recipes: dict[str, Recipe], shipped: dict[str, dict], out_dir: Path) -> None:
    """Each foundation's final metrics beside the shipped manifest's, so a reproduction can be judged."""
    table = TextTable(
        f"tiny foundations written to {out_dir}",
        ["foundation", "metric", "this run", "shipped", "difference"],
    )
    for name, recipe in recipes.items():
        reference = shipped.get(name, {}).get("metrics", {})
        for metric, value in sorted(recipe.metrics.items()):
            if metric in reference:
                difference = f"{value - reference[metric]:+.3f}"
                table.add_row(name, metric, f"{value:.3f}", f"{reference[metric]:.3f}", difference)
            else:
                table.add_row(name, metric, f"{value:.3f}", MISSING, MISSING)
    print_table(table)
