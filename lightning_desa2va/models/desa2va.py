"""The DeSa2VA model: VLM ``[SEG]`` state → decoupler → text and visual prompts → SAM-2 → fused mask.

A pure ``nn.Module`` (no Lightning inside): the stages in :mod:`lightning_desa2va.stages` decide what
trains and on which loss. Components arrive already configured (from the Hydra config groups) as
factories that still need the widths only the built foundations know (d of the VLM, C of SAM-2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_desa2va.models.decoupler import Decoupler, SegEmbeddings
from lightning_desa2va.models.fusion import FusedMask, Fusion
from lightning_desa2va.models.motion_prompt import StatedMotion
from lightning_desa2va.models.sam2 import FrameFeatures, LanguagePromptedSAM2, MaskPrediction
from lightning_desa2va.models.text_prompt import TextPrompt, TextPromptHead
from lightning_desa2va.models.visual_prompt import TokenVisualPrompt
from lightning_desa2va.models.vlm import SegTokenVLM


@dataclass
class DeSa2VAOutput:
    """Every mask the triple supervision needs, per frame [B, T, H, W], and the diagnostics."""

    text_logits: Tensor
    visual_logits: Tensor
    fused_logits: Tensor
    embeddings: SegEmbeddings
    gate: Tensor | None
    lm_loss: Tensor | None
    text_points: Tensor | None  # [B, T, K, 2] in pixels
    text_heatmap: Tensor | None  # [B, T, K, h, w] logits, for prompts found on the frame
    image_embeddings: Tensor  # [B·T, C, h, w] what the mask decoder attended to, motion cue included
    stated_motion: StatedMotion | None = None  # what the motion prompt read from z_t (if it has one)


@dataclass
class TextSegmentation:
    """Stage 1's output: text mask logits [B, T, H, W], the text prompt of every frame (one row per frame,
    clip by clip) and the image embeddings [B·T, C, h, w] the masks were decoded from."""

    logits: Tensor
    prompt: TextPrompt
    image_embeddings: Tensor


class DeSa2VA(nn.Module):
    """VLM + SAM-2 joined by a decoupled ``[SEG]`` token."""

    def __init__(
        self,
        vlm: SegTokenVLM,
        sam: LanguagePromptedSAM2,
        decoupler: Callable[..., Decoupler],
        text_prompt: Callable[..., TextPromptHead],
        visual_prompt: Callable[..., TokenVisualPrompt],
        fusion: Callable[..., Fusion],
        motion_cue: Callable[..., nn.Module],
        motion_prompt: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.sam = sam
        width = sam.prompt_dim
        self.decoupler = decoupler(in_dim=vlm.hidden_size, out_dim=width)
        self.text_prompt = text_prompt(in_dim=width, prompt_dim=width)
        self.visual_prompt = visual_prompt(in_dim=width, prompt_dim=width)
        self.fusion = fusion(embed_dim=width)
        self.motion_cue = motion_cue(embed_dim=width, high_res_dims=sam.high_res_dims)
        self.motion_prompt = motion_prompt(in_dim=width, prompt_dim=width)

    def encode_frames(self, frames: Tensor) -> FrameFeatures:
        """SAM-2 image features of clips [B, T, 3, H, W], flattened to B·T frames, with the motion cue."""
        return self.motion_cue(frames, self.sam.encode_frames(frames.flatten(0, 1)))

    def text_masks(
        self, features: FrameFeatures, z_text: Tensor, num_frames: int, dense: Tensor | None = None
    ) -> tuple[Tensor, TextPrompt]:
        """Text mask logits [B·T, 1, H, W] from z_t [B, C]: the clip's z_t prompts each of its frames
        (with the motion prompt's ``dense`` embeddings, if any)."""
        prompt = self.text_prompt(z_text.repeat_interleave(num_frames, dim=0), self.sam, features)
        masks = self.sam.decode_prompts(
            features, prompt.tokens, multimask=self.text_prompt.single_click, dense_prompts=dense
        )
        return masks.logits, prompt

    def visual_masks(
        self, features: FrameFeatures, z_visual: Tensor, num_frames: int, dense: Tensor | None = None
    ) -> MaskPrediction:
        """Visual mask prediction for every frame from z_v [B, C]."""
        tokens = self.visual_prompt(z_visual).repeat_interleave(num_frames, dim=0)
        return self.sam.decode_prompts(features, tokens, dense_prompts=dense)

    def segment_text(self, frames: Tensor, input_ids: Tensor, attention_mask: Tensor) -> TextSegmentation:
        """Stage 1: text-only VLM pass on the label prompt → z_t → text masks of the clips [B, T, ...].

        No motion prompt: the label states no motion (it names the look only)."""
        batch, num_frames = frames.shape[:2]
        seg_hidden = self.vlm(input_ids, attention_mask).seg_hidden
        z_text = self.decoupler(seg_hidden).text
        features = self.encode_frames(frames)
        logits, prompt = self.text_masks(features, z_text, num_frames)
        return TextSegmentation(
            logits.view(batch, num_frames, *logits.shape[-2:]), prompt, features.image_embeddings
        )

    def propagate(self, frames: Tensor, key_frame_logits: Tensor) -> Tensor:
        """Sa2VA-style inference: the key-frame mask [B, H, W] (frame 0) seeds SAM-2's memory, which tracks
        the object through every frame of the clips [B, T, 3, H, W]; returns mask logits [B, T, H, W]."""
        mask_inputs = (key_frame_logits > 0).float().unsqueeze(1)
        return self.sam.track_from_prompt(frames, mask_inputs=mask_inputs)

    def forward(
        self,
        frames: Tensor,
        vlm_pixels: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
    ) -> DeSa2VAOutput:
        """Stage 2 and inference: frames [B, T, 3, H, W] for SAM-2, [B, T, 3, s, s] for the VLM."""
        batch, num_frames = frames.shape[:2]
        vlm_out = self.vlm(input_ids, attention_mask, vlm_pixels.flatten(0, 1), labels)
        embeddings = self.decoupler(vlm_out.seg_hidden)
        features = self.encode_frames(frames)
        motion = self.motion_prompt(embeddings.text, frames, features)
        text_logits, prompt = self.text_masks(features, embeddings.text, num_frames, motion.dense)
        visual_logits = self.visual_masks(features, embeddings.visual, num_frames, motion.dense).logits
        per_frame = SegEmbeddings(
            text=embeddings.text.repeat_interleave(num_frames, dim=0),
            visual=embeddings.visual.repeat_interleave(num_frames, dim=0),
        )
        fused: FusedMask = self.fusion(text_logits, visual_logits, per_frame)

        def clip_view(logits: Tensor) -> Tensor:
            return logits.view(batch, num_frames, *logits.shape[-2:])

        def per_clip(rows: Tensor | None) -> Tensor | None:
            return None if rows is None else rows.view(batch, num_frames, *rows.shape[1:])

        return DeSa2VAOutput(
            text_logits=clip_view(text_logits),
            visual_logits=clip_view(visual_logits),
            fused_logits=clip_view(fused.logits),
            embeddings=embeddings,
            gate=None if fused.gate is None else clip_view(fused.gate),
            lm_loss=vlm_out.lm_loss,
            text_points=per_clip(prompt.points),
            text_heatmap=per_clip(prompt.heatmap_logits),
            image_embeddings=features.image_embeddings,
            stated_motion=motion.stated,
        )
