"""The DeSa2VA model: VLM ``[SEG]`` state → decoupler → text and visual prompts → SAM-2 → fused mask.

A pure ``nn.Module`` (no Lightning inside): the stages in :mod:`lightning_desa2va.stages` decide what
trains and on which loss. Components arrive already configured (from the Hydra config groups) as
factories that still need the widths only the built foundations know (d of the VLM, C of SAM-2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_desa2va.models.decoupler import Decoupler, SegEmbeddings
from lightning_desa2va.models.fusion import FusedMask, Fusion
from lightning_desa2va.models.motion_prompt import StatedMotion
from lightning_desa2va.models.sam2 import FrameFeatures, LanguagePromptedSAM2, MaskPrediction
from lightning_desa2va.models.text_prompt import TextPrompt, TextPromptHead
from lightning_desa2va.models.vlm import SegTokenVLM

IMAGE_RESOLUTION, DECODER_RESOLUTION = "image", "decoder"
"""Resolutions a text or visual mask can be returned at (:attr:`MaskRequest.aux_resolution`)."""
AUX_MASKS = ("text", "visual")
"""The masks ``aux_resolution`` places: the fused mask, the answer, is always at the image's resolution."""


@dataclass(frozen=True)
class MaskRequest:
    """Which masks a caller needs from :meth:`DeSa2VA.forward`; the model decodes only what they need.

    The fused mask needs the masks its fusion reads (``Fusion.reads_text`` / ``reads_visual``), so e.g.
    ``MaskRequest(text=False, visual=False)`` with ``fusion=visual`` decodes the visual mask alone.
    """

    fused: bool = True
    text: bool = True
    visual: bool = True
    aux_resolution: str = IMAGE_RESOLUTION
    """Where the text and visual masks are returned: ``image`` (upsampled, as the fused mask) or
    ``decoder`` (SAM-2's low-resolution logits, a quarter of the image a side, with no upsampling)."""

    def decodes(self, fusion: Fusion) -> tuple[bool, bool]:
        """Whether the text and the visual mask are decoded under ``fusion``."""
        return (
            self.text or (self.fused and fusion.reads_text),
            self.visual or (self.fused and fusion.reads_visual),
        )


EVERY_MASK = MaskRequest()
FUSED_ONLY = MaskRequest(fused=True, text=False, visual=False)
"""What evaluation needs: the fused mask, so the masks its fusion reads."""


@dataclass
class DeSa2VAOutput:
    """The masks that were requested per frame [B, T, H, W] (``None``: not requested; the text and visual
    masks [B, T, h, w] at the decoder's resolution if so requested), and the diagnostics."""

    text_logits: Tensor | None
    visual_logits: Tensor | None
    fused_logits: Tensor | None
    embeddings: SegEmbeddings
    gate: Tensor | None  # [B, T, h, w] the fusion's weight on the text mask at the decoder's resolution
    lm_loss: Tensor | None
    text_heatmap: Tensor | None  # [B, T, K, h, w] logits, for prompts found on the frame
    image_embeddings: Tensor  # [B·T, C, h, w] what the mask decoder attended to, motion cue included
    stated_motion: StatedMotion | None = None  # what the motion prompt read from z_t (if it has one)
    text_iou: Tensor | None = None  # [B, T] SAM-2's IoU prediction for the text mask
    visual_iou: Tensor | None = None  # [B, T] ... and for the visual mask
    vlm_answers: Tensor | None = None  # [B, L - 1] the VLM's argmax where the next token is labelled


@dataclass
class TextSegmentation:
    """Stage 1's output: text mask logits [B, T, H, W], the text prompt of every frame (one row per frame,
    clip by clip) and the image embeddings [B·T, C, h, w] the masks were decoded from."""

    logits: Tensor
    prompt: TextPrompt
    image_embeddings: Tensor


@dataclass
class Prompt:
    """One prompt set for SAM-2's mask decoder: sparse tokens [N, K, C], one row per frame."""

    tokens: Tensor
    multimask: bool = False


def frames_of_rows(features: FrameFeatures, clip_index: Tensor, num_frames: int) -> FrameFeatures:
    """Features of clips' frames (clip by clip) as the rows of ``clip_index`` [B] read them, B·T rows."""
    rows = (clip_index[:, None] * num_frames + torch.arange(num_frames, device=clip_index.device)).flatten()
    return FrameFeatures(
        image_embeddings=features.image_embeddings[rows],
        high_res_features=[level[rows] for level in features.high_res_features],
        frames=features.frames[rows],
    )


class DeSa2VA(nn.Module):
    """VLM + SAM-2 joined by a decoupled ``[SEG]`` token."""

    def __init__(
        self,
        vlm: SegTokenVLM,
        sam: LanguagePromptedSAM2,
        decoupler: Callable[..., Decoupler],
        text_prompt: Callable[..., TextPromptHead],
        visual_prompt: Callable[..., nn.Module],
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

    def text_prompts(self, features: FrameFeatures, z_text: Tensor, num_frames: int) -> TextPrompt:
        """The text prompt of every frame from z_t [B, C]: the clip's z_t prompts each of its frames."""
        return self.text_prompt(z_text.repeat_interleave(num_frames, dim=0), self.sam, features)

    def decode(
        self, features: FrameFeatures, prompts: dict[str, Prompt], dense: Tensor | None = None
    ) -> dict[str, MaskPrediction]:
        """Masks at the decoder's resolution of several prompt sets on the same frames (with the motion
        prompt's ``dense`` embeddings, if any). Sets of the same shape go through SAM-2's mask decoder in one
        call; the frames' features are computed once for all of them."""
        groups: dict[tuple[int, bool], list[str]] = {}
        for name, prompt in prompts.items():
            groups.setdefault((prompt.tokens.shape[1], prompt.multimask), []).append(name)
        masks: dict[str, MaskPrediction] = {}
        for (_, multimask), names in groups.items():
            sets = [prompts[name].tokens for name in names]
            tokens = torch.cat(sets) if len(sets) > 1 else sets[0]
            decoded = self.sam.decode_prompts(features, tokens, multimask=multimask, dense_prompts=dense)
            for name, logits, iou in zip(
                names, decoded.logits.chunk(len(names)), decoded.iou.chunk(len(names)), strict=True
            ):
                masks[name] = MaskPrediction(logits=logits, iou=iou)
        return masks

    def segment_text(
        self, frames: Tensor, input_ids: Tensor, attention_mask: Tensor, clip_index: Tensor | None = None
    ) -> TextSegmentation:
        """Stage 1: text-only VLM pass on the label prompt → z_t → text masks of the clips [B, T, ...].

        No motion prompt: the label states no motion (it names the look only). With ``clip_index`` [B],
        ``frames`` holds V distinct clips, each encoded once, and row b reads clip ``clip_index[b]``."""
        batch, num_frames = input_ids.shape[0], frames.shape[1]
        seg_hidden = self.vlm(input_ids, attention_mask).seg_hidden
        z_text = self.decoupler(seg_hidden).text
        features = self.encode_frames(frames)
        if clip_index is not None:
            features = frames_of_rows(features, clip_index, num_frames)
        prompt = self.text_prompts(features, z_text, num_frames)
        masks = self.decode(features, {"text": Prompt(prompt.tokens, self.text_prompt.single_click)})
        logits = self.sam.upsample(masks["text"].logits)
        return TextSegmentation(
            logits.view(batch, num_frames, *logits.shape[-2:]), prompt, features.image_embeddings
        )

    def propagate(
        self,
        frames: Tensor,
        key_frames: list[int],
        key_frame_logits: Tensor,
        clip_index: Tensor | None = None,
    ) -> Tensor:
        """Sa2VA-style inference: the masks [B, K, H, W] of ``key_frames`` seed SAM-2's memory, which
        tracks the object through every frame of the clips [B, T, 3, H, W]; returns mask logits
        [B, T, H, W], the key frames' own logits on the key frames. With ``clip_index`` [B], ``frames``
        holds V distinct clips [V, T, 3, H, W], each encoded once, and row b tracks in clip
        ``clip_index[b]``."""
        mask_inputs = (key_frame_logits > 0).float()
        features = self.sam.encode_clips(frames)
        if clip_index is not None:
            features = features.select(clip_index)
        tracked = self.sam.track_masks(features, key_frames, mask_inputs)
        tracked[:, key_frames] = key_frame_logits.to(tracked.dtype)
        return tracked

    def forward(
        self,
        frames: Tensor,
        vlm_pixels: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        masks: MaskRequest = EVERY_MASK,
        clip_index: Tensor | None = None,
    ) -> DeSa2VAOutput:
        """Stage 2 and inference: frames [B, T, 3, H, W] for SAM-2, [B, T, 3, s, s] for the VLM.

        ``masks`` says which masks are needed; a mask nothing needs is not decoded (its output is ``None``),
        so e.g. the Sa2VA baseline (``decoupler=none fusion=visual``, w_t = 0) runs one decode per frame.
        The text and the visual prompts share the frames' features and their decoder call where their
        shapes allow; the fusion works at the decoder's resolution and only the requested masks are
        upsampled, in one call (the text and visual masks not at all when ``masks.aux_resolution`` is
        ``decoder``). With ``clip_index`` [B], ``frames`` holds V distinct clips [V, T, 3, H, W]
        and row b (expression b) reads clip ``clip_index[b]``: SAM-2 encodes each clip once, however many
        expressions ask about it.
        """
        batch, num_frames = input_ids.shape[0], frames.shape[1]
        decode_text, decode_visual = masks.decodes(self.fusion)
        vlm_out = self.vlm(input_ids, attention_mask, vlm_pixels.flatten(0, 1), labels)
        embeddings = self.decoupler(vlm_out.seg_hidden)
        features = self.encode_frames(frames)
        motion = self.motion_prompt(embeddings.text, frames, features, clip_index)
        if clip_index is not None:
            features = frames_of_rows(features, clip_index, num_frames)
        prompts: dict[str, Prompt] = {}
        text_prompt: TextPrompt | None = None
        if decode_text:
            text_prompt = self.text_prompts(features, embeddings.text, num_frames)
            prompts["text"] = Prompt(text_prompt.tokens, self.text_prompt.single_click)
        if decode_visual:
            tokens = self.visual_prompt(embeddings.visual).repeat_interleave(num_frames, dim=0)
            prompts["visual"] = Prompt(tokens)
        decoded = self.decode(features, prompts, motion.dense)
        text, visual = decoded.get("text"), decoded.get("visual")
        fused: FusedMask | None = None
        if masks.fused:
            per_frame = SegEmbeddings(
                text=embeddings.text.repeat_interleave(num_frames, dim=0),
                visual=embeddings.visual.repeat_interleave(num_frames, dim=0),
            )
            fused = self.fusion(
                text if self.fusion.reads_text else None,
                visual if self.fusion.reads_visual else None,
                per_frame,
            )
        requested = {
            name: prediction.logits
            for name, prediction, wanted in (
                ("text", text, masks.text),
                ("visual", visual, masks.visual),
                ("fused", fused, masks.fused),
            )
            if wanted and prediction is not None
        }
        kept_low = AUX_MASKS if masks.aux_resolution == DECODER_RESOLUTION else ()
        full = {name: logits[:, 0] for name, logits in requested.items() if name in kept_low}
        to_upsample = {name: logits for name, logits in requested.items() if name not in kept_low}
        if to_upsample:
            upsampled = self.sam.upsample(torch.cat(list(to_upsample.values()), dim=1))
            full.update(zip(to_upsample, upsampled.unbind(1), strict=True))

        def of_clips(rows: Tensor | None, channel: bool) -> Tensor | None:
            """Rows [B·T, ...] as [B, T, ...], dropping a per-frame channel of 1 (masks [B·T, 1, h, w] →
            [B, T, h, w], IoUs [B·T, 1] → [B, T]); ``None`` stays ``None``."""
            if rows is None:
                return None
            return rows.reshape(batch, num_frames, *rows.shape[2 if channel else 1 :])

        return DeSa2VAOutput(
            text_logits=of_clips(full.get("text"), channel=False),
            visual_logits=of_clips(full.get("visual"), channel=False),
            fused_logits=of_clips(full.get("fused"), channel=False),
            embeddings=embeddings,
            gate=of_clips(fused and fused.gate, channel=True),
            lm_loss=vlm_out.lm_loss,
            text_heatmap=of_clips(text_prompt and text_prompt.heatmap_logits, channel=False),
            image_embeddings=features.image_embeddings,
            stated_motion=motion.stated,
            text_iou=of_clips(text and text.iou, channel=True),
            visual_iou=of_clips(visual and visual.iou, channel=True),
            vlm_answers=vlm_out.answers,
        )
