"""Comparison tables on the test split: an ablation's every variant, or a search's confirmed configurations.

A row is one configuration: its test scores as mean ± std over seeds, its J&F with a 95% bootstrap interval
over expressions and seeds, and its paired difference from the named control and from the best row (paired
bootstrap over the same expressions and seeds, :mod:`lightning_desa2va.tuning.stats`); a difference whose
interval contains 0 is marked ``≈``: the data cannot tell the two apart. Each row also shows the validation
value the study chose on and the training steps its arms spent (arms of unequal budget are flagged). An
ablation's rows are its complete trials grouped by their sampled values without the seed; the table names
the study's profile and is written as markdown with a bar chart of J&F per expression type.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lightning_desa2va.console import TextTable, markdown_table
from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.files import atomic_write, atomic_write_text
from lightning_desa2va.tuning.objective import EXPRESSIONS_ATTR, SECONDS_ATTR, STEPS_ATTR, TEST_ATTR
from lightning_desa2va.tuning.spec import SEED_PARAM, SweepSpec, describe, grid_values
from lightning_desa2va.tuning.stats import (
    ExpressionScores,
    Interval,
    SeedScores,
    jf_interval,
    paired_difference,
)

JF_COLUMNS = {"JF": "J&F", **{f"JF/{kind}": f"J&F {kind}" for kind in EXPRESSION_TYPES}}
COLUMNS = {
    **{key: header for key, header in JF_COLUMNS.items() if key != "JF"},
    "qa_accuracy": "QA acc",
    "diag/abs_cos_zt_zv": "|cos(zt,zv)|",
    "diag/principal_cos_max": "max principal cos",
    "diag/gate_mean": "gate mean",
}
"""Test metrics shown after J&F and its comparisons (J&F per type, QA accuracy, the diagnostics)."""
CI_COLUMN, CONTROL_COLUMN, BEST_COLUMN = "J&F 95% CI", "Δ vs control", "Δ vs best"
SECONDS_COLUMN = "wall s"
BASELINE_LABEL = "Sa2VA baseline"
SAME = "≈"
P_SHOWN = 0.001  # p-values are shown to 3 decimals
MISSING = "-"
TABLE_FILE = "ablation.md"
MIN_GROUP_INCHES = 1.6
LABEL_CHAR_INCHES = 0.11
"""A bar group's width in inches: at least 1.6, else its longest label line at font size 8 (~0.11 in a
character, the axes' margins included)."""


@dataclass
class Variant:
    """One configuration's test scores, one entry per seed (trial, or seed within a trial)."""

    label: str
    values: dict[str, Any] = field(default_factory=dict)  # what the configuration sets, the seed aside
    scores: list[dict[str, float]] = field(default_factory=list)
    expressions: SeedScores = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    control: bool = False

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        values = [scores[metric] for scores in self.scores if metric in scores]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def add_seed(self, seed: int, test: dict[str, float], expressions: dict[str, list[Any]] | None) -> None:
        self.scores.append(test)
        if expressions is not None:
            self.expressions[seed] = ExpressionScores(**expressions)


@dataclass
class AblationReport:
    table: TextTable
    variants: list[Variant]
    files: list[Path]
    notes: list[str] = field(default_factory=list)


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
        control = spec.baseline is not None and spec.baseline in values.values()
        if control:
            label = f"{label} ({BASELINE_LABEL})"
        variant = variants.setdefault(order, Variant(label, values, control=control))
        tests = trial.user_attrs.get(TEST_ATTR, [])
        expressions = trial.user_attrs.get(EXPRESSIONS_ATTR, [])
        base_seed = trial.params.get(SEED_PARAM, 0)
        for index, test in enumerate(tests):
            variant.add_seed(
                base_seed + index, test, expressions[index] if index < len(expressions) else None
            )
        variant.seconds += [trial.user_attrs.get(SECONDS_ATTR, 0.0) / max(1, len(tests))] * len(tests)
        variant.steps.append(int(trial.user_attrs.get(STEPS_ATTR, 0)))
        variant.val.append(float(trial.values[0]))
    return [variants[key] for key in sorted(variants)]


def cell(value: tuple[float, float] | None, seeds: int) -> str:
    if value is None:
        return MISSING
    mean, std = value
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def interval_cell(interval: Interval | None) -> str:
    return MISSING if interval is None else f"[{interval.low:.3f}, {interval.high:.3f}]"


def difference_cell(difference: Interval | None) -> str:
    """``+0.170 [+0.151, +0.188] p=0.001``, with ``≈`` when the interval contains 0."""
    if difference is None:
        return MISSING
    text = (
        f"{difference.value:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}] p={difference.p_value:.3f}"
    )
    return f"{text} {SAME}" if difference.contains_zero else text


def table_title(spec: SweepSpec, what: str) -> str:
    level = round(100 * spec.stats.confidence)
    return (
        f"{spec.name}: {what} on the test split ({spec.profile} profile); mean ± std over seeds; "
        f"{level}% CI: bootstrap over expressions × seeds ({spec.stats.resamples} resamples); "
        f"Δ [CI] p: paired bootstrap over the same expressions and seeds (two-sided p), "
        f"{SAME}: the CI contains 0 (not told apart)"
    )


def comparison_table(spec: SweepSpec, title: str, variants: list[Variant]) -> TextTable:
    """The rows of ``variants`` with their intervals and paired comparisons (control: ``spec.baseline``)."""
    stats = (spec.stats.resamples, spec.stats.confidence, spec.stats.seed)
    headers = ["variant", "seeds", "steps", f"val {spec.metric[0]}", "J&F", CI_COLUMN, CONTROL_COLUMN]
    table = TextTable(title, [*headers, BEST_COLUMN, *COLUMNS.values(), SECONDS_COLUMN])
    controls = [variant for variant in variants if variant.control]
    scored = [variant for variant in variants if variant.mean_std("JF")]
    best = max(scored, key=lambda variant: variant.mean_std("JF")[0], default=None)
    for variant in variants:
        seeds = len(variant.scores)
        steps = ",".join(str(count) for count in sorted(set(variant.steps))) or MISSING
        val = f"{statistics.fmean(variant.val):.3f}" if variant.val else MISSING
        wall = statistics.fmean(variant.seconds) if variant.seconds else 0.0
        table.add_row(
            variant.label,
            str(seeds),
            steps,
            val,
            cell(variant.mean_std("JF"), seeds),
            interval_cell(jf_interval(variant.expressions, *stats) if variant.expressions else None),
            "control"
            if variant.control
            else compared(variant, control_of(variant, controls, spec.baseline), stats),
            "best" if variant is best else compared(variant, best, stats),
            *(cell(variant.mean_std(metric), seeds) for metric in COLUMNS),
            f"{wall:.0f}",
        )
    return table


def control_of(variant: Variant, controls: list[Variant], baseline: str | None) -> Variant | None:
    """The control row to pair ``variant`` with: the one that sets what ``variant`` sets besides the
    compared parameter (e.g. the same motion prompt), else the first."""
    for control in controls:
        shared = {key: value for key, value in control.values.items() if value != baseline}
        if all(variant.values.get(key) == value for key, value in shared.items()):
            return control
    return controls[0] if controls else None


def compared(variant: Variant, other: Variant | None, stats: tuple[int, float, int]) -> str:
    """The paired difference ``variant - other`` as a cell ("-" without a row to compare with)."""
    if other is None or not variant.expressions or not other.expressions:
        return MISSING
    return difference_cell(paired_difference(variant.expressions, other.expressions, *stats))


def budget_note(variants: list[Variant]) -> list[str]:
    """A warning line when the arms of a comparison trained different total steps."""
    steps = {variant.label: sorted(set(variant.steps)) for variant in variants if variant.steps}
    if len({tuple(counts) for counts in steps.values()}) <= 1:
        return []
    listed = "; ".join(f"{label}: {','.join(map(str, counts))}" for label, counts in steps.items())
    return [f"UNEQUAL BUDGETS: the arms trained different total steps ({listed})"]


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
    atomic_write(
        path, lambda temporary: figure.savefig(temporary, dpi=100, bbox_inches="tight", format="png")
    )
    pyplot.close(figure)
    return path


def write_report(
    spec: SweepSpec, variants: list[Variant], what: str, folder: Path, stem: str
) -> AblationReport:
    """The table (also as markdown, notes after it) and the bar chart in the study's folder."""
    table = comparison_table(spec, table_title(spec, what), variants)
    notes = budget_note(variants)
    markdown = folder / f"{stem}.md"
    atomic_write_text(markdown, "\n\n".join([markdown_table(table), *notes]) + "\n")
    files = [markdown]
    if variants:
        files.append(bar_chart(variants, f"{spec.name} ({spec.profile} profile)", folder / f"{stem}.png"))
    return AblationReport(table, variants, files, notes)


def build_report(study: optuna.Study, spec: SweepSpec, folder: Path) -> AblationReport:
    """An ablation's table of every variant and its chart (``ablation.md``, ``ablation.png``)."""
    return write_report(spec, collect_variants(study, spec), "every variant", folder, Path(TABLE_FILE).stem)
