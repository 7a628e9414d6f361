"""The ablation table: each variant's test scores as mean ± std over its seeds, the Sa2VA baseline a row.

Variants are the complete trials grouped by their sampled values without the seed. Scores come from the test
split (validation chose nothing here, but is what a sweep optimises); the table names the study's profile,
and is written as markdown with a bar chart of J&F per expression type (error bars: std over seeds).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lightning_desa2va.console import TextTable, markdown_table
from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.tuning.objective import SECONDS_ATTR, TEST_ATTR
from lightning_desa2va.tuning.spec import SEED_PARAM, SweepSpec, describe, grid_values

JF_COLUMNS = {"JF": "J&F", **{f"JF/{kind}": f"J&F {kind}" for kind in EXPRESSION_TYPES}}
COLUMNS = {
    **JF_COLUMNS,
    "qa_accuracy": "QA acc",
    "diag/abs_cos_zt_zv": "|cos(zt,zv)|",
    "diag/principal_cos_max": "max principal cos",
    "diag/gate_mean": "gate mean",
}
"""Test metrics the table shows (J&F per type, QA accuracy, the disentanglement diagnostics), by header."""
SECONDS_COLUMN = "wall s"
BASELINE_LABEL = "Sa2VA baseline"
MISSING = "-"
CHART_FILE = "ablation.png"
TABLE_FILE = "ablation.md"
MIN_GROUP_INCHES = 1.6
LABEL_CHAR_INCHES = 0.11
"""A bar group's width in inches: at least 1.6, else its longest label line at font size 8 (~0.11 in a
character, the axes' margins included)."""


@dataclass
class Variant:
    """One configuration's scores, one entry per seed (trial or seed within a trial)."""

    label: str
    scores: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        values = [scores[metric] for scores in self.scores if metric in scores]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class AblationReport:
    table: TextTable
    variants: list[Variant]
    files: list[Path]


def collect_variants(study: optuna.Study, spec: SweepSpec) -> list[Variant]:
    """Complete trials grouped by their values other than the seed, in the order of the spec's space."""
    grid = grid_values(spec)
    variants: dict[tuple, Variant] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        values = {name: value for name, value in trial.params.items() if name != SEED_PARAM}
        order = tuple(
            grid[name].index(value) if value in grid.get(name, []) else -1 for name, value in values.items()
        )
        label = describe(values) if len(values) > 1 else str(next(iter(values.values())))
        if spec.baseline is not None and spec.baseline in values.values():
            label = f"{label} ({BASELINE_LABEL})"
        variant = variants.setdefault(order, Variant(label))
        tests = trial.user_attrs.get(TEST_ATTR, [])
        variant.scores += tests
        variant.seconds += [trial.user_attrs.get(SECONDS_ATTR, 0.0) / max(1, len(tests))] * len(tests)
    return [variants[key] for key in sorted(variants)]


def cell(value: tuple[float, float] | None, seeds: int) -> str:
    if value is None:
        return MISSING
    mean, std = value
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def ablation_table(spec: SweepSpec, variants: list[Variant]) -> TextTable:
    title = f"{spec.name}: mean ± std over seeds on the test split ({spec.profile} profile)"
    table = TextTable(title, ["variant", "seeds", *COLUMNS.values(), SECONDS_COLUMN])
    for variant in variants:
        seeds = len(variant.scores)
        figures = [cell(variant.mean_std(metric), seeds) for metric in COLUMNS]
        wall = statistics.fmean(variant.seconds) if variant.seconds else 0.0
        table.add_row(variant.label, str(seeds), *figures, f"{wall:.0f}")
    return table


def chart_label(label: str) -> str:
    """One override a line, the baseline's note on its own, so a group's label is no wider than its bars."""
    return re.sub(r" (?=\S+=|\()", "\n", label)


def bar_chart(variants: list[Variant], title: str, path: Path) -> Path:
    """Grouped bars: J&F overall and per expression type for every variant, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [chart_label(variant.label) for variant in variants]
    longest = max(len(line) for label in labels for line in label.splitlines())
    group_inches = max(MIN_GROUP_INCHES, LABEL_CHAR_INCHES * longest)
    figure, axes = pyplot.subplots(figsize=(max(6.0, group_inches * len(variants)), 4.0))
    width = 0.8 / len(JF_COLUMNS)
    for index, (metric, header) in enumerate(JF_COLUMNS.items()):
        stats = [variant.mean_std(metric) or (0.0, 0.0) for variant in variants]
        positions = [x + (index - (len(JF_COLUMNS) - 1) / 2) * width for x in range(len(variants))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=header)
    axes.set_xticks(range(len(variants)), labels, fontsize=8)
    axes.set_ylabel("J&F on test")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot.close(figure)
    return path


def build_report(study: optuna.Study, spec: SweepSpec, folder: Path) -> AblationReport:
    """The table (also as markdown) and the bar chart in the study's folder."""
    variants = collect_variants(study, spec)
    table = ablation_table(spec, variants)
    markdown = folder / TABLE_FILE
    markdown.write_text(markdown_table(table) + "\n")
    files = [markdown]
    if variants:
        files.append(bar_chart(variants, f"{spec.name} ({spec.profile} profile)", folder / CHART_FILE))
    return AblationReport(table, variants, files)
