"""The summary people read at the end of a run: J&F overall and per expression type, beside the baseline."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.foundations import Recipe

COLUMNS = {
    "JF": "J&F",
    **{f"JF/{kind}": f"J&F {kind}" for kind in EXPRESSION_TYPES},
    "J": "J",
    "F": "F",
    "mask_share/lookalike": "lookalike",
}


def summary_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """One row per model (or baseline), J&F overall / static / motion / mixed, J and F, and the share of the
    predicted masks on objects that look like a target but are not one (motion decides those)."""
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for header in COLUMNS.values():
        table.add_column(header, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[c]:.3f}" if c in scores else "-" for c in COLUMNS))
    return table


def print_summary(title: str, rows: dict[str, dict[str, float]], footer: list[str]) -> None:
    """Render the summary table and the lines after it (where the runs are) on the terminal."""
    console = Console()
    console.print(summary_table(title, rows))
    for line in footer:
        console.print(line)


def print_metrics(title: str, rows: dict[str, dict[str, float]]) -> None:
    """Every metric of each run, for stages whose metrics are not J&F per type (foundation pretraining)."""
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, scores in rows.items():
        for metric, value in sorted(scores.items()):
            table.add_row(name, metric, f"{value:.3f}")
    Console().print(table)


def print_counts(title: str, rows: dict[str, int]) -> None:
    """Named counts, one per line (what a shard conversion wrote and skipped)."""
    table = Table(title=title, box=None, show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, count in rows.items():
        table.add_row(name, str(count))
    Console().print(table)


def print_reproduction(recipes: dict[str, Recipe], shipped: dict[str, dict], out_dir: Path) -> None:
    """Each foundation's final metrics beside the shipped manifest's, so a reproduction can be judged."""
    table = Table(title=f"tiny foundations written to {out_dir}")
    for header in ("foundation", "metric", "this run", "shipped", "difference"):
        table.add_column(header, justify="right" if header not in ("foundation", "metric") else "left")
    for name, recipe in recipes.items():
        reference = shipped.get(name, {}).get("metrics", {})
        for metric, value in sorted(recipe.metrics.items()):
            if metric in reference:
                table.add_row(
                    name,
                    metric,
                    f"{value:.3f}",
                    f"{reference[metric]:.3f}",
                    f"{value - reference[metric]:+.3f}",
                )
            else:
                table.add_row(name, metric, f"{value:.3f}", "-", "-")
    Console().print(table)
