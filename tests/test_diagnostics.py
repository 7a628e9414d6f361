"""Disentanglement diagnostics: principal angles between subspaces, |cos(z_t, z_v)| and gate statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_desa2va.diagnostics import DisentanglementMetric, principal_angle_cosines, subspace_overlap


def test_principal_angle_cosines_of_known_subspaces() -> None:
    e = torch.eye(4)
    assert torch.allclose(principal_angle_cosines(e[:2], e[2:]), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(principal_angle_cosines(e[:2], 3 * e[[1, 0]]), torch.ones(2, dtype=torch.float64))
    tilted = torch.stack([e[0], (e[1] + e[2]) / math.sqrt(2)])  # shares e0, 45° from e1
    cosines = principal_angle_cosines(e[:2], tilted)
    assert cosines.tolist() == pytest.approx([1.0, math.cos(math.pi / 4)])


def test_principal_angles_read_the_row_space_not_the_rows() -> None:
    """A map [C, d] of rank r reads an r-dim subspace, however many rows it has."""
    e = torch.eye(6)
    low_rank = torch.randn(8, 2) @ e[:2]  # 8 rows spanning span(e0, e1)
    assert principal_angle_cosines(low_rank, e[2:4]).max() < 1e-6
    assert len(principal_angle_cosines(low_rank, e[:3])) == 2


def test_subspace_overlap_reports_max_and_mean_or_nothing() -> None:
    e = torch.eye(3)
    tilted = torch.stack([e[0], (e[1] + e[2]) / math.sqrt(2)])
    overlap = subspace_overlap((e[:2], tilted))
    assert overlap == pytest.approx({"principal_cos_max": 1.0, "principal_cos_mean": (1 + 0.5**0.5) / 2})
    assert subspace_overlap(None) == {}


def test_disentanglement_metric_per_type_hand_values() -> None:
    metric = DisentanglementMetric()
    z_text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    z_visual = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [1.0, 0.0]])  # |cos| 0, 1, 1/√2
    gate = torch.tensor([0.0, 1.0, 0.5]).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    metric.update(z_text, z_visual, gate, ["static", "motion", "motion"])
    results = metric.compute()
    assert results["abs_cos_zt_zv"] == pytest.approx((0 + 1 + 0.5**0.5) / 3)
    assert results["abs_cos_zt_zv/static"] == pytest.approx(0.0)
    assert results["abs_cos_zt_zv/motion"] == pytest.approx((1 + 0.5**0.5) / 2)
    assert results["gate_mean"] == pytest.approx(0.5)
    assert results["gate_std"] == pytest.approx(torch.tensor([0.0, 1.0, 0.5]).std(unbiased=False).item())
    assert results["gate_mean/motion"] == pytest.approx(0.75)
    assert results["gate_std/motion"] == pytest.approx(0.25)
    assert "abs_cos_zt_zv/mixed" not in results


def test_disentanglement_metric_without_a_gate_reports_only_the_cosine() -> None:
    metric = DisentanglementMetric()
    metric.update(torch.ones(2, 3), torch.ones(2, 3), None, ["mixed", "mixed"])
    assert metric.compute() == pytest.approx({"abs_cos_zt_zv": 1.0, "abs_cos_zt_zv/mixed": 1.0})
