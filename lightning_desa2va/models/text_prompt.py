"""Text prompts: turn the text embedding z_t into sparse prompt tokens for SAM-2's mask decoder.

Config group ``text_prompt``. ``tokens`` maps z_t to K sparse tokens directly (as Sa2VA's visual prompt
does with its one token). ``points`` is DeSa2VA's point-level prompt: z_t predicts K points whose
coordinates and labels SAM-2's own prompt encoder embeds, plus a content embedding per point so the
prompt also carries what the text said, not only where. ``grounded_points`` finds each point on the frame
instead of regressing it: z_t scores every cell of SAM-2's image embedding and the point is the expected
cell position, so a SAM-2 pretrained on clicks receives a click on the object the text describes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_desa2va.models.sam2 import FrameFeatures, LanguagePromptedSAM2


@dataclass
class TextPrompt:
    """Sparse prompt tokens [N, K, C] and, for grounded points, the heatmap logits [N, K, h, w] the points
    were read from (one row per frame)."""

    tokens: Tensor
    heatmap_logits: Tensor | None = None


RGB_CHANNELS = 3


class TextPromptHead(nn.Module, ABC):
    """Base class: ``forward(z_t, sam, features)`` gives one :class:`TextPrompt` per frame."""

    @property
    def single_click(self) -> bool:
        """Whether the prompt is one click on the frame, which SAM-2 decodes as an ambiguous prompt."""
        return False

    @abstractmethod
    def forward(self, z_text: Tensor, sam: LanguagePromptedSAM2, features: FrameFeatures) -> TextPrompt:
        """``z_text`` [N, C] for the N frames whose SAM-2 ``features`` are given."""

    @staticmethod
    def positive_labels(points: Tensor) -> Tensor:
        return torch.ones(points.shape[:2], dtype=torch.int32, device=points.device)


class TokenTextPrompt(TextPromptHead):
    """z_t → K sparse prompt tokens [N, K, C] = reshape(W z_t + b): no points, nothing SAM-2's prompt encoder
    knows, only what the mask decoder learns to read."""

    def __init__(self, in_dim: int, prompt_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.to_tokens = nn.Linear(in_dim, num_tokens * prompt_dim)

    def forward(self, z_text: Tensor, sam: LanguagePromptedSAM2, features: FrameFeatures) -> TextPrompt:
        """Tokens from z_t alone: the frame's ``features`` are not looked at."""
        return TextPrompt(tokens=self.to_tokens(z_text).view(z_text.shape[0], self.num_tokens, -1))


class PointTextPrompt(TextPromptHead):
    """z_t → K positive point prompts (SAM-2 prompt encoder) + K content embeddings."""

    def __init__(self, in_dim: int, prompt_dim: int, num_points: int) -> None:
        super().__init__()
        self.num_points = num_points
        self.to_coords = nn.Linear(in_dim, num_points * 2)
        self.to_content = nn.Linear(in_dim, num_points * prompt_dim)

    def forward(self, z_text: Tensor, sam: LanguagePromptedSAM2, features: FrameFeatures) -> TextPrompt:
        """Points from z_t alone: the frame's ``features`` are not looked at."""
        batch = z_text.shape[0]
        coords = self.coordinates(z_text, sam.image_size)
        content = self.to_content(z_text).view(batch, self.num_points, -1)
        return TextPrompt(tokens=sam.embed_points(coords, self.positive_labels(coords)) + content)

    def coordinates(self, z_text: Tensor, image_size: int) -> Tensor:
        """The K points [N, K, 2] in pixels, x = σ(W z_t + b) · image size: always inside the frame."""
        return torch.sigmoid(self.to_coords(z_text)).view(z_text.shape[0], self.num_points, 2) * image_size


class GroundedPointTextPrompt(TextPromptHead):
    """z_t → K points found on the frame.

    Every cell of the stride-8 grid is scored against z_t by a small additive-attention MLP; a cell is
    described by SAM-2's image embedding (with its positional encoding, so z_t can also say *where*),
    the decoder's stride-8 high-resolution features and the frame's mean colour there (a SAM-2 trained
    only for class-agnostic masks keeps little colour). Each point is the centre of its heatmap's best
    cell; the stride-16 grid alone is too coarse, a small object straddles its cells. The content
    embeddings start at zero, so the first clicks are exactly what SAM-2 was pretrained on.
    """

    def __init__(self, in_dim: int, prompt_dim: int, num_points: int, hidden_dim: int) -> None:
        super().__init__()
        self.num_points = num_points
        # SAM-2's mask decoder projects its stride-8 features to prompt_dim // 4 channels (conv_s1).
        key_channels = prompt_dim + prompt_dim // 4 + RGB_CHANNELS
        self.to_keys = nn.Conv2d(key_channels, hidden_dim, kernel_size=1)
        self.to_query = nn.Linear(in_dim, hidden_dim)
        self.to_heatmap = nn.Conv2d(hidden_dim, num_points, kernel_size=1)
        self.to_content = nn.Linear(in_dim, num_points * prompt_dim)
        nn.init.zeros_(self.to_content.weight)
        nn.init.zeros_(self.to_content.bias)

    @property
    def single_click(self) -> bool:
        return self.num_points == 1

    def forward(self, z_text: Tensor, sam: LanguagePromptedSAM2, features: FrameFeatures) -> TextPrompt:
        fine = features.high_res_features[-1]
        coarse = features.image_embeddings + sam.sam_prompt_encoder.get_dense_pe().to(fine.dtype)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        colours = F.adaptive_avg_pool2d(features.frames.to(fine.dtype), fine.shape[-2:])
        hidden = (
            self.to_keys(torch.cat([coarse, fine, colours], dim=1)) + self.to_query(z_text)[:, :, None, None]
        )
        heatmap = self.to_heatmap(torch.relu(hidden))
        rows, cols = heatmap.shape[-2:]
        coords = self.click_positions(
            heatmap.flatten(2), self.cell_centres(rows, cols, sam.image_size, heatmap.device)
        )
        content = self.to_content(z_text).view(z_text.shape[0], self.num_points, -1)
        tokens = sam.embed_points(coords, self.positive_labels(coords)) + content
        return TextPrompt(tokens=tokens, heatmap_logits=heatmap)

    @staticmethod
    def click_positions(heatmap: Tensor, centres: Tensor) -> Tensor:
        """The centre of each heatmap's best cell [N, K, 2], with the gradient of the softmax-weighted mean
        (straight-through): a mean alone lands between two candidate objects, on neither."""
        weights = heatmap.softmax(-1)
        soft = weights @ centres
        hard = centres[heatmap.argmax(-1)]
        return hard + soft - soft.detach()

    @staticmethod
    def cell_centres(rows: int, cols: int, image_size: int, device: torch.device) -> Tensor:
        """Pixel (x, y) of every cell centre of a rows × cols grid over the image [rows·cols, 2]."""
        ys = (torch.arange(rows, device=device) + 0.5) * image_size / rows
        xs = (torch.arange(cols, device=device) + 0.5) * image_size / cols
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1).flatten(0, 1)
