"""Disentanglement diagnostics: how far apart z_t and z_v are, and how the fusion leans.

DESIGN asks every run to show whether decoupling happened: the mean |cos(z_t, z_v)| of the embeddings,
the principal angles between the subspaces of the normalised ``[SEG]`` state the two read (from the
decoupler's weights, when it is linear), and the mean and spread of the fusion's gate on the text mask,
per expression type. Stage 2 logs them as ``val/diag/...`` at every validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.metrics import type_index


def principal_angle_cosines(first: Tensor, second: Tensor) -> Tensor:
    """Cosines of the principal angles between the row spaces of two maps [m, d], largest first.

    1 means a direction of the input both maps read; all 0 means orthogonal subspaces. Each row space is
    spanned by the right singular vectors above the numerical-rank tolerance of the maps' own precision
    (NumPy's ``matrix_rank`` rule), in float64; the cosines are the singular values of Q_1 Q_2ᵀ.
    """
    eps = torch.finfo(first.dtype).eps

    def row_space(weights: Tensor) -> Tensor:
        _, singular, basis = torch.linalg.svd(weights.detach().double(), full_matrices=False)
        rank = int((singular > singular[0] * max(weights.shape) * eps).sum())
        return basis[:rank]

    return torch.linalg.svdvals(row_space(first) @ row_space(second).T)


def subspace_overlap(maps: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    """``principal_cos_max`` and ``principal_cos_mean`` of a decoupler's ``subspace_maps`` (nothing for a
    decoupler that is not linear)."""
    if maps is None:
        return {}
    cosines = principal_angle_cosines(*maps)
    return {"principal_cos_max": cosines.max().item(), "principal_cos_mean": cosines.mean().item()}


class DisentanglementMetric(torchmetrics.Metric):
    """Mean |cos(z_t, z_v)| per sample, and the gate's mean and standard deviation over every pixel of every
    frame, overall and per expression type (sums that sync across processes).

    Logged as ``abs_cos_zt_zv``, ``gate_mean``, ``gate_std`` and each ``/<type>``; the gate entries only
    for a fusion that has a gate.
    """

    full_state_update = False
    STATES = ("cos_sum", "samples", "gate_sum", "gate_square_sum", "gate_pixels")

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in self.STATES:
            self.add_state(
                name, default=torch.zeros(len(EXPRESSION_TYPES), dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(
        self, z_text: Tensor, z_visual: Tensor, gate: Tensor | None, expression_types: Sequence[str]
    ) -> None:
        """Embeddings [B, C], the fusion's gate [B, T, H, W] (or ``None``), one expression type per sample."""
        types = type_index(expression_types, self.cos_sum.device)
        cosine = F.cosine_similarity(z_text.detach(), z_visual.detach(), dim=-1).abs()
        self.cos_sum.index_add_(0, types, cosine.to(self.cos_sum.dtype))
        self.samples.index_add_(0, types, torch.ones_like(self.samples[types]))
        if gate is None:
            return
        values = gate.detach().flatten(1).to(self.gate_sum.dtype)
        self.gate_sum.index_add_(0, types, values.sum(1))
        self.gate_square_sum.index_add_(0, types, values.square().sum(1))
        self.gate_pixels.index_add_(0, types, torch.full_like(values[:, 0], values.shape[1]))

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        per_type = [(f"/{kind}", index) for index, kind in enumerate(EXPRESSION_TYPES)]
        for suffix, index in [("", slice(None)), *per_type]:
            samples = self.samples[index].sum()
            if samples == 0:
                continue
            results[f"abs_cos_zt_zv{suffix}"] = (self.cos_sum[index].sum() / samples).item()
            pixels = self.gate_pixels[index].sum()
            if pixels > 0:
                mean = self.gate_sum[index].sum() / pixels
                variance = (self.gate_square_sum[index].sum() / pixels - mean.square()).clamp(min=0)
                results[f"gate_mean{suffix}"] = mean.item()
                results[f"gate_std{suffix}"] = variance.sqrt().item()
        return results
