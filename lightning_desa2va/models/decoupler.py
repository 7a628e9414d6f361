"""Decouplers: map the VLM's ``[SEG]`` hidden state h to a text embedding z_t and a visual embedding z_v.

Config group ``decoupler``. Every decoupler first normalises h (``input_norm``, ĥ = norm(h)), then:

- ``none`` (Sa2VA): one MLP, z_t and z_v are the same tensor;
- ``linear`` (DeSa2VA's linear decoupling): two linear maps, nothing keeps them apart;
- ``linear_ortho``: ``linear`` plus a soft orthogonality penalty (``loss.w_orth`` weighs it);
- ``orthogonal``: z_t and z_v read exactly orthogonal subspaces of ĥ (row blocks of one orthogonal map);
- ``mlp``: two MLPs.

The penalty belongs to the variant: a decoupler that defines one says so (``has_penalty``) and
``loss.w_orth`` weighs it; for the others ``w_orth`` has nothing to weigh (the stage logs that once).
Decouplers built from linear maps expose them (``subspace_maps``), so the disentanglement diagnostics can
measure the principal angles between the subspaces of ĥ that z_t and z_v read. All are built with their
input and output widths by the model assembler; the YAML holds only their hyperparameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import orthogonal

InputNorm = Literal["none", "layer", "batch"]


@dataclass
class SegEmbeddings:
    """The ``[SEG]`` state split for the two prompt paths, each [B, C]."""

    text: Tensor
    visual: Tensor


class Decoupler(nn.Module, ABC):
    """Base class: ``forward(h)`` gives :class:`SegEmbeddings`."""

    #: Whether the decoupler has a regulariser of its own (``orthogonality_penalty``, weighed by w_orth).
    has_penalty: ClassVar[bool] = False
    #: Submodules that z_t alone ("text") or z_v alone ("visual") reads: a stage that reads one embedding
    #: freezes the other's branch (distributed training needs a gradient for every trainable parameter).
    #: Empty where both embeddings come from the same maps.
    branches: ClassVar[dict[str, tuple[str, ...]]] = {"text": (), "visual": ()}

    @abstractmethod
    def forward(self, seg_hidden: Tensor) -> SegEmbeddings: ...

    def subspace_maps(self) -> tuple[Tensor, Tensor] | None:
        """The linear maps [C, d] of the normalised state ĥ that z_t and z_v are (bias aside), or ``None``
        for a decoupler that is not linear in ĥ."""
        return None


class NoDecoupler(Decoupler):
    """Sa2VA's projection: z_t = z_v = W_2 ReLU(W_1 ĥ) (one MLP shared by both prompt paths)."""

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
    """DeSa2VA's linear decoupling: z_t = W_t ĥ + b_t, z_v = W_v ĥ + b_v (no constraint between them)."""

    branches: ClassVar[dict[str, tuple[str, ...]]] = {"text": ("to_text",), "visual": ("to_visual",)}

    def __init__(self, in_dim: int, out_dim: int, input_norm: InputNorm = "none") -> None:
        super().__init__()
        self.norm = build_input_norm(input_norm, in_dim)
        self.to_text = nn.Linear(in_dim, out_dim)
        self.to_visual = nn.Linear(in_dim, out_dim)

    def forward(self, seg_hidden: Tensor) -> SegEmbeddings:
        h = self.norm(seg_hidden)
        return SegEmbeddings(text=self.to_text(h), visual=self.to_visual(h))

    def subspace_maps(self) -> tuple[Tensor, Tensor]:
        return self.to_text.weight, self.to_visual.weight


class LinearOrthoDecoupler(LinearDecoupler):
    """``linear`` with a soft orthogonality penalty L_orth = mean_b cos²(z_t,b, z_v,b).

    The penalty keeps the two embeddings of each sample apart, not the maps: it is 0 when z_t ⟂ z_v.
    Same parameters (names and initialisation order) as :class:`LinearDecoupler`.
    """

    has_penalty: ClassVar[bool] = True

    def orthogonality_penalty(self, embeddings: SegEmbeddings) -> Tensor:
        """Mean squared cosine between z_t and z_v: 0 when the two carry unrelated signals."""
        return F.cosine_similarity(embeddings.text, embeddings.visual, dim=-1).pow(2).mean()


class OrthogonalDecoupler(Decoupler):
    """Exactly orthogonal subspaces: one map Q with orthonormal rows (r_t + r_v rows of an orthogonal d×d
    map, kept so by ``parametrizations.orthogonal``) split into row blocks Q_t (r_t rows) and Q_v (the next
    r_v rows), each lifted to C by its own linear map:

        z_t = L_t (Q_t ĥ) + b_t,    z_v = L_v (Q_v ĥ) + b_v,    Q_t Q_vᵀ = 0.

    r_t = round(``text_fraction``·d), r_v = round(``visual_fraction``·d), r_t + r_v ≤ d: with the tiny
    model's d = C = 64 two C-dimensional orthogonal subspaces do not fit in R^d, so each path reads an
    r-dimensional subspace and lifts it. z_t and z_v are functions of orthogonal projections of ĥ, so no
    direction of ĥ reaches both, whatever training does to Q, L_t and L_v.
    """

    branches: ClassVar[dict[str, tuple[str, ...]]] = {"text": ("lift_text",), "visual": ("lift_visual",)}

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        text_fraction: float = 0.5,
        visual_fraction: float = 0.5,
        input_norm: InputNorm = "none",
    ) -> None:
        super().__init__()
        self.text_rank = round(text_fraction * in_dim)
        self.visual_rank = round(visual_fraction * in_dim)
        if min(self.text_rank, self.visual_rank) < 1 or self.text_rank + self.visual_rank > in_dim:
            raise ValueError(
                f"decoupler.text_fraction={text_fraction} and decoupler.visual_fraction={visual_fraction} "
                f"give {self.text_rank} + {self.visual_rank} rows of a {in_dim}-dim state: each needs at "
                f"least 1 and together at most {in_dim}"
            )
        self.norm = build_input_norm(input_norm, in_dim)
        self.rotation = orthogonal(nn.Linear(in_dim, self.text_rank + self.visual_rank, bias=False))
        self.lift_text = nn.Linear(self.text_rank, out_dim)
        self.lift_visual = nn.Linear(self.visual_rank, out_dim)

    def forward(self, seg_hidden: Tensor) -> SegEmbeddings:
        coordinates = self.rotation(self.norm(seg_hidden))
        text, visual = coordinates.split([self.text_rank, self.visual_rank], dim=-1)
        return SegEmbeddings(text=self.lift_text(text), visual=self.lift_visual(visual))

    def subspace_maps(self) -> tuple[Tensor, Tensor]:
        text, visual = self.rotation.weight.split([self.text_rank, self.visual_rank], dim=0)
        return self.lift_text.weight @ text, self.lift_visual.weight @ visual


class MLPDecoupler(Decoupler):
    """Two MLPs: z_t = W_t2 GELU(W_t1 ĥ), z_v = W_v2 GELU(W_v1 ĥ) (hidden width ``hidden_dim``, default d)."""

    branches: ClassVar[dict[str, tuple[str, ...]]] = {"text": ("to_text",), "visual": ("to_visual",)}

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, input_norm: InputNorm = "none"
    ) -> None:
        super().__init__()
        hidden = hidden_dim or in_dim
        self.norm = build_input_norm(input_norm, in_dim)
        self.to_text = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.to_visual = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, seg_hidden: Tensor) -> SegEmbeddings:
        h = self.norm(seg_hidden)
        return SegEmbeddings(text=self.to_text(h), visual=self.to_visual(h))
