"""Decouplers: map the VLM's ``[SEG]`` hidden state h to a text embedding z_t and a visual embedding z_v.

Config group ``decoupler``: ``none`` is Sa2VA (one MLP, z_t and z_v are the same tensor), ``linear`` is
DeSa2VA's linear decoupling into two subspaces. Both are built with their input and output widths by the
model assembler; the YAML holds only their hyperparameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

InputNorm = Literal["none", "layer", "batch"]


@dataclass
class SegEmbeddings:
    """The ``[SEG]`` state split for the two prompt paths, each [B, C]."""

    text: Tensor
    visual: Tensor


class Decoupler(nn.Module, ABC):
    """Base class: ``forward(h)`` gives :class:`SegEmbeddings`; ``orthogonality_penalty`` scores overlap."""

    @abstractmethod
    def forward(self, seg_hidden: Tensor) -> SegEmbeddings: ...

    def orthogonality_penalty(self, embeddings: SegEmbeddings) -> Tensor:
        """Mean squared cosine between z_t and z_v: 0 when the two subspaces carry unrelated signals."""
        return F.cosine_similarity(embeddings.text, embeddings.visual, dim=-1).pow(2).mean()


class NoDecoupler(Decoupler):
    """Sa2VA's projection: one MLP h → z shared by both prompt paths (nothing decoupled)."""

    def __init__(
        self, in_dim: int, out_dim: int, dropout: float = 0.0, input_norm: InputNorm = "none"
    ) -> None:
        super().__init__()
        self.norm = build_input_norm(input_norm, in_dim)
        self.project = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim), nn.Dropout(dropout)
        )

    def forward(self, seg_hidden: Tensor) -> SegEmbeddings:
        z = self.project(self.norm(seg_hidden))
        return SegEmbeddings(text=z, visual=z)

    def orthogonality_penalty(self, embeddings: SegEmbeddings) -> Tensor:
        """One shared embedding has no second subspace to keep apart."""
        return embeddings.text.new_zeros(())


class BatchStandardize(nn.BatchNorm1d):
    """Batch normalisation of [B, d] states that uses its running statistics for a batch of one (a single
    state has nothing to be standardised against; plain BatchNorm raises in training)."""

    def forward(self, states: Tensor) -> Tensor:
        if self.training and states.shape[0] == 1:
            return F.batch_norm(
                states,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                eps=self.eps,
            )
        return super().forward(states)


def build_input_norm(kind: InputNorm, width: int) -> nn.Module:
    """How the ``[SEG]`` state is normalised before it is split.

    ``batch`` standardises every dimension across the batch: a VLM that was never trained on ``[SEG]``
    gives nearly the same state for every expression (the shared part dwarfs the expression's), and
    removing the shared part is what let the prompt heads tell expressions apart. ``layer`` normalises
    each state alone: with a VLM pre-trained on the referent objective it refers more reliably, free of
    the noise of small-batch statistics (README, "Referring").
    """
    if kind == "batch":
        return BatchStandardize(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


class LinearDecoupler(Decoupler):
    """DeSa2VA's linear decoupling: two linear maps h → z_t and h → z_v."""

    def __init__(self, in_dim: int, out_dim: int, input_norm: InputNorm = "none") -> None:
        super().__init__()
        self.norm = build_input_norm(input_norm, in_dim)
        self.to_text = nn.Linear(in_dim, out_dim)
        self.to_visual = nn.Linear(in_dim, out_dim)

    def forward(self, seg_hidden: Tensor) -> SegEmbeddings:
        h = self.norm(seg_hidden)
        return SegEmbeddings(text=self.to_text(h), visual=self.to_visual(h))
