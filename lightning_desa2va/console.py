"""What the command line shows: tables that print whole anywhere, and third-party noise kept out.

Tables are drawn with rich on a terminal wide enough for them; anywhere else (a narrower terminal, output
piped to a file as CI and ``nohup`` runs do) they print as markdown, which never cuts a header or a figure.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
ADVERT_PREFIX = "💡 Tip:"
"""How Lightning starts its adverts for its cloud products (litlogger, litmodels)."""

# torch deprecated LeafSpec, which Lightning 2.6 still checks on every logged dict: nothing for us to fix.
UNLIMITED_WIDTH = 1 << 16
"""Width to measure a table at: what it needs when nothing constrains it."""
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@dataclass
class TextTable:
    """A table as text cells: the first column names the row, the others right-aligned figures."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row {cells} has {len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(list(cells))


def rich_table(table: TextTable) -> Table:
    drawn = Table(title=table.title)
    for index, header in enumerate(table.headers):
        drawn.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
    for row in table.rows:
        drawn.add_row(*row)
    return drawn


def markdown_table(table: TextTable) -> str:
    """The table as GitHub markdown, under its title; a ``|`` inside a cell (``|cos(zt,zv)|``) is escaped,
    or it would split the cell."""
    headers, *rows = [[cell.replace("|", "\\|") for cell in row] for row in (table.headers, *table.rows)]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * widths[0], *("-" * (width - 1) + ":" for width in widths[1:])]
    return "\n".join([f"{table.title}\n", line(headers), line(rule), *map(line, rows)])


def print_table(table: TextTable, lines_after: Sequence[str] = (), stream: TextIO | None = None) -> None:
    """Draw ``table`` with rich where it fits a terminal, else as markdown; then ``lines_after`` in full."""
    stream = stream or sys.stdout
    console = Console(file=stream)
    drawn = rich_table(table)
    natural_width = Measurement.get(console, console.options.update_width(UNLIMITED_WIDTH), drawn).maximum
    if console.is_terminal and natural_width <= console.width:
        console.print(drawn)
        for line in lines_after:
            console.print(line, overflow="ignore", crop=False, soft_wrap=True)
        return
    stream.write(markdown_table(table) + "\n")
    for line in lines_after:
        stream.write(line + "\n")
    stream.flush()


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


def quiet_third_party_output() -> None:
    """Drop what libraries print that a user cannot act on: Lightning's adverts and a deprecation inside
    Lightning. Every other warning stays."""
    logging.getLogger(LIGHTNING_INFO_LOGGER).addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
