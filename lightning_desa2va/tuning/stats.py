"""Intervals and paired comparisons over the test split's per-expression scores.

A variant's J&F over seeds s and expressions e is ``mean_{s,e} jf[s, e]`` with ``jf = (J + F) / 2`` per
expression (the benchmark's J&F is the mean of the two means, the same number). Its uncertainty has two
sources, the test expressions drawn and the training seed, so the bootstrap resamples both at once: each
resample draws S seeds and E expressions with replacement and weighs ``jf`` by how often each was drawn
(a two-way bootstrap; scipy's ``bootstrap`` resamples along one axis only). The 95% interval is the
percentile interval of those means.

Two variants are compared **paired**: over the seeds and expressions both were scored on, one resample
draws the same seeds and expressions for both, so what the difference's interval measures is the
variants' difference and not how hard the drawn expressions were. The two-sided p-value is twice the
share of resampled differences on the far side of 0. A difference whose interval contains 0 is one the
data cannot tell apart.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_desa2va.files import atomic_write

SCORE_COLUMNS = ("id", "type", "J", "F")


@dataclass
class ExpressionScores:
    """One run's test scores, one entry per expression (``id`` names it the same in every run)."""

    ids: list[str]
    types: list[str]
    j: list[float]
    f: list[float]

    @property
    def jf(self) -> np.ndarray:
        return (np.asarray(self.j) + np.asarray(self.f)) / 2

    def as_dict(self) -> dict[str, list[Any]]:
        return asdict(self)

    def write_csv(self, path: Path) -> Path:
        def write(temporary: Path) -> None:
            with temporary.open("w", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(SCORE_COLUMNS)
                writer.writerows(zip(self.ids, self.types, self.j, self.f, strict=True))

        return atomic_write(path, write)

    @classmethod
    def read_csv(cls, path: Path) -> ExpressionScores:
        with path.open() as stream:
            rows = list(csv.DictReader(stream))
        return cls(
            [row["id"] for row in rows],
            [row["type"] for row in rows],
            [float(row["J"]) for row in rows],
            [float(row["F"]) for row in rows],
        )


@dataclass
class Interval:
    value: float
    low: float
    high: float
    p_value: float | None = None  # a difference's: the paired bootstrap's two-sided p

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


SeedScores = dict[int, ExpressionScores]
"""A variant's scores by seed (the seed's index among the variant's runs when the seed is the config's)."""


def aligned(variants: list[SeedScores]) -> list[np.ndarray]:
    """One seeds × expressions J&F matrix per variant over the seeds and expressions all of them have."""
    seeds = sorted(set.intersection(*(set(scores) for scores in variants)))
    ids = (
        set.intersection(*(set(scores[seed].ids) for scores in variants for seed in seeds))
        if seeds
        else set()
    )
    order = sorted(ids)
    matrices = []
    for scores in variants:
        rows = []
        for seed in seeds:
            by_id = dict(zip(scores[seed].ids, scores[seed].jf, strict=True))
            rows.append([by_id[name] for name in order])
        matrices.append(np.asarray(rows, dtype=float).reshape(len(seeds), len(order)))
    return matrices


def resampled_means(matrices: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """The mean of each S × E matrix under the same ``resamples`` two-way bootstrap draws."""
    rng = np.random.default_rng(seed)
    n_seeds, n_expressions = matrices[0].shape
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)
    expression_counts = rng.multinomial(
        n_expressions, np.full(n_expressions, 1 / n_expressions), size=resamples
    )
    scale = n_seeds * n_expressions
    return [np.einsum("bs,se,be->b", seed_counts, matrix, expression_counts) / scale for matrix in matrices]


def percentile(samples: np.ndarray, value: float, confidence: float) -> Interval:
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(value, float(low), float(high))


def jf_interval(scores: SeedScores, resamples: int, confidence: float, seed: int) -> Interval | None:
    """A variant's J&F (mean over its seeds and expressions) and its bootstrap interval."""
    (matrix,) = aligned([scores])
    if matrix.size == 0:
        return None
    (means,) = resampled_means([matrix], resamples, seed)
    return percentile(means, float(matrix.mean()), confidence)


def paired_difference(
    first: SeedScores, second: SeedScores, resamples: int, confidence: float, seed: int
) -> Interval | None:
    """``first - second`` in J&F over the seeds and expressions both have, its paired bootstrap interval
    and two-sided p-value; None when they share no seed or expression."""
    a, b = aligned([first, second])
    if a.size == 0:
        return None
    means_a, means_b = resampled_means([a, b], resamples, seed)
    differences = means_a - means_b
    interval = percentile(differences, float(a.mean() - b.mean()), confidence)
    far_side = min(np.sum(differences <= 0), np.sum(differences >= 0))
    # add one: no resample on the far side says p < 2 / (B + 1), the bootstrap's resolution, not p = 0
    interval.p_value = float(min(1.0, 2 * (far_side + 1) / (differences.size + 1)))
    return interval
