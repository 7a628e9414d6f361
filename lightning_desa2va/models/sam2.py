"""SAM-2 from the ``sam2`` package, extended so that language prompts enter its mask decoder.

The model is the package's own :class:`~sam2.modeling.sam2_base.SAM2Base`, built from its packaged Hydra
configs (with size overrides for the tiny default) and optionally loaded from an official ``.pt``
checkpoint. :class:`LanguagePromptedSAM2` adds the calls the DeSa2VA pipeline needs: encode a batch of
frames once, then decode masks from arbitrary sparse prompt embeddings (the projected ``[SEG]`` state,
point prompts, or both), as Sa2VA feeds its language embedding to SAM-2; and track a prompted object
through a clip with SAM-2's own memory (``track_step``), which both the promptable pre-training of the tiny
SAM-2 and Sa2VA-style inference (key-frame mask → memory propagation) use.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.config import config_module
from lightning_desa2va.errors import WeightsFormatError

log = logging.getLogger(__name__)

SAM2_TARGET = "lightning_desa2va.models.sam2.LanguagePromptedSAM2"
CACHING_ENCODER_TARGET = "lightning_desa2va.models.frame_cache.CachingImageEncoder"
SAM2_CONFIG_MODULE = "sam2"
SAM2_HYDRA_VERSION_BASE = "1.2"  # what the sam2 package itself initialises with
_CLIP_DIMS = 4  # [T, 3, H, W]: one clip without a batch dimension
SAFETENSORS_SUFFIX = ".safetensors"
SHOWN_KEYS = 3  # keys an error about a checkpoint lists of each kind


def as_maps(feats: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM-2's flattened features [HW, N, C] as maps [N, C, h, w]."""
    return feats.permute(1, 2, 0).reshape(feats.shape[1], feats.shape[2], *size)


@dataclass
class FrameFeatures:
    """Image features of a batch of frames, computed once and decoded against several prompts."""

    image_embeddings: Tensor  # [N, C, h, w], lowest resolution level with ``no_mem_embed`` added
    high_res_features: list[Tensor]  # the two finer levels, already projected by the mask decoder
    frames: Tensor  # [N, 3, H, W], the normalised frames the features came from


@dataclass
class MaskPrediction:
    """Mask logits at the mask decoder's resolution (a quarter of the image's) and SAM-2's own IoU estimate
    for them; :meth:`LanguagePromptedSAM2.upsample` brings logits to the image's resolution."""

    logits: Tensor  # [N, 1, image_size / 4, image_size / 4]
    iou: Tensor  # [N, 1]


@dataclass
class ClipFeatures:
    """Backbone features of B clips of T frames, stored frame-major as SAM-2's ``track_step`` takes them.

    Levels are SAM-2's flattened ``[HW, T·B, C]`` maps; frame t of every clip is columns ``t·B:(t+1)·B``,
    so one ``track_step`` call tracks one object per clip, all clips at once.
    """

    vision_feats: list[Tensor]
    vision_pos_embeds: list[Tensor]
    feat_sizes: list[tuple[int, int]]
    num_clips: int
    num_frames: int

    def frame(self, index: int) -> tuple[list[Tensor], list[Tensor]]:
        """Features and position embeddings of frame ``index`` of every clip."""
        columns = slice(index * self.num_clips, (index + 1) * self.num_clips)
        return [f[:, columns] for f in self.vision_feats], [p[:, columns] for p in self.vision_pos_embeds]

    def image_embeddings(self) -> Tensor:
        """The lowest-resolution level (the one the mask decoder attends to) as maps [T·B, C, h, w],
        frame-major, without memory."""
        return as_maps(self.vision_feats[-1], self.feat_sizes[-1])

    def select(self, clip_index: Tensor) -> ClipFeatures:
        """Features of the clips ``clip_index`` [N] (repeated ones track several objects of one clip)."""
        frames = torch.arange(self.num_frames, device=clip_index.device)[:, None]
        columns = (frames * self.num_clips + clip_index[None, :]).flatten()
        return ClipFeatures(
            vision_feats=[f[:, columns] for f in self.vision_feats],
            vision_pos_embeds=[p[:, columns] for p in self.vision_pos_embeds],
            feat_sizes=self.feat_sizes,
            num_clips=len(clip_index),
            num_frames=self.num_frames,
        )


@dataclass
class TrackOutput:
    """What tracking one object per clip through T frames produced, per frame t (frame 0 prompted)."""

    logits: Tensor  # [B, T, image_size, image_size]: the mask SAM-2 chose and wrote to its memory
    candidate_logits: list[Tensor]  # per frame [B, M_t, image_size, image_size]: every decoder output
    candidate_ious: list[Tensor]  # per frame [B, M_t]: SAM-2's IoU estimate of each candidate
    object_score_logits: Tensor  # [B, T]: SAM-2's "object is visible" logit


class LanguagePromptedSAM2(SAM2Base):
    """SAM-2 whose mask decoder also takes language-derived sparse prompt embeddings.

    ``chunk_frames`` (``None``: all at once) bounds how many frames the image encoder runs on at a time:
    its activations at 1024 px (Hiera-L) are ~1 GB a frame, so a whole video in one batch does not fit a GPU,
    while the features it keeps are a few tens of MB a frame.
    """

    chunk_frames: int | None = None

    @property
    def prompt_dim(self) -> int:
        """Width C of SAM-2's prompt tokens: the size every language prompt is projected to."""
        return self.sam_prompt_embed_dim

    @property
    def high_res_dims(self) -> list[int]:
        """Widths of the finer feature levels the mask decoder adds when upscaling (strides 4 and 8)."""
        decoder = self.sam_mask_decoder
        return [decoder.conv_s0.out_channels, decoder.conv_s1.out_channels]

    def encode_frames(self, frames: Tensor) -> FrameFeatures:
        """Run the image encoder on ``frames`` [N, 3, H, W] (normalised as SAM-2 expects)."""
        vision_feats, _, feat_sizes = self._encode(frames)
        # Frames decoded without memory get the learned "no memory" embedding, as SAM-2 does itself.
        vision_feats[-1] = vision_feats[-1] + self.no_mem_embed
        maps = [as_maps(feat, size) for feat, size in zip(vision_feats, feat_sizes, strict=True)]
        return FrameFeatures(image_embeddings=maps[-1], high_res_features=maps[:-1], frames=frames)

    def decode_prompts(
        self,
        features: FrameFeatures,
        sparse_prompts: Tensor,
        multimask: bool = False,
        dense_prompts: Tensor | None = None,
    ) -> MaskPrediction:
        """Decode one mask per row from sparse prompt embeddings [P·N, K, C]: P prompt sets for the N frames
        of ``features``, set by set, all in one call of the mask decoder (each frame's features are shared
        by its P prompts, not recomputed).

        ``dense_prompts`` [N, C, h, w] (e.g. the motion prompt) add to SAM-2's "no mask" dense embedding.
        ``multimask``: decode SAM-2's candidate masks and keep the one its IoU head rates best, as SAM-2
        itself does for a single click (its single-mask output is trained for unambiguous prompts only).
        Logits stay at the decoder's resolution: callers upsample what they need, once.
        """
        num_frames = features.image_embeddings.shape[0]
        sets = sparse_prompts.shape[0] // num_frames
        if sets * num_frames != sparse_prompts.shape[0] or sparse_prompts.shape[-1] != self.prompt_dim:
            raise ValueError(
                f"sparse prompts of shape {tuple(sparse_prompts.shape)} do not fit {num_frames} frames "
                f"and SAM-2 prompt width {self.prompt_dim}"
            )
        _, dense = self.sam_prompt_encoder(points=None, boxes=None, masks=None)
        dense = dense.expand(num_frames, -1, -1, -1)
        if dense_prompts is not None:
            dense = dense + dense_prompts.to(dense.dtype)

        def per_row(maps: Tensor) -> Tensor:
            return maps if sets == 1 else maps.repeat(sets, 1, 1, 1)

        low_res, iou, _, _ = self.sam_mask_decoder(
            image_embeddings=per_row(features.image_embeddings),
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_prompts.to(features.image_embeddings.dtype),
            dense_prompt_embeddings=per_row(dense),
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[per_row(level) for level in features.high_res_features],
        )
        if multimask:
            best = iou.argmax(dim=1, keepdim=True)
            low_res = low_res.gather(1, best[:, :, None, None].expand(-1, -1, *low_res.shape[-2:]))
            iou = iou.gather(1, best)
        return MaskPrediction(logits=low_res.float(), iou=iou.float())

    def upsample(self, logits: Tensor) -> Tensor:
        """Mask logits [N, M, h, w] at the image's resolution [N, M, image_size, image_size] (bilinear, as
        SAM-2 upsamples its own masks), M masks a frame in one call (as N·M one-channel maps: on CPU the
        backward pass of several channels at once is slower)."""
        size = (self.image_size, self.image_size)
        maps = logits.reshape(-1, 1, *logits.shape[-2:])
        upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return upsampled.view(*logits.shape[:2], *size)

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """Encode point prompts (pixel coordinates [N, P, 2], labels [N, P]) with SAM-2's prompt encoder."""
        return self.sam_prompt_encoder._embed_points(coords, labels, pad=False)

    def encode_clips(self, frames: Tensor) -> ClipFeatures:
        """Run the image encoder once on clips [B, T, 3, H, W] for tracking (no memory added yet)."""
        num_clips, num_frames = frames.shape[:2]
        vision_feats, vision_pos_embeds, feat_sizes = self._encode(frames.transpose(0, 1).flatten(0, 1))
        return ClipFeatures(vision_feats, vision_pos_embeds, feat_sizes, num_clips, num_frames)

    def _encode(self, frames: Tensor) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """SAM-2's flattened features and position embeddings ([HW, N, C] per level) of frames [N, 3, H, W],
        encoded ``chunk_frames`` at a time."""
        chunks = frames.split(self.chunk_frames) if self.chunk_frames else [frames]
        parts = [self._prepare_backbone_features(self.forward_image(chunk))[1:] for chunk in chunks]
        if len(parts) == 1:
            return parts[0]
        levels = range(len(parts[0][0]))
        vision_feats = [torch.cat([part[0][level] for part in parts], dim=1) for level in levels]
        vision_pos_embeds = [torch.cat([part[1][level] for part in parts], dim=1) for level in levels]
        return vision_feats, vision_pos_embeds, parts[0][2]

    def _track_step(self, *args: Any, **kwargs: Any) -> tuple[dict, tuple, Any, Any]:
        """SAM-2's per-frame step, also keeping every candidate mask, its IoU estimate and the object score
        in the frame's output: ``track_step`` drops them in training mode, but promptable training
        supervises them (as the ``sam2`` repository's own ``SAM2Train`` does)."""
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        _, candidates, ious, _, _, _, object_score_logits = sam_outputs
        current_out.update(
            candidate_masks_high_res=candidates,
            candidate_ious=ious,
            object_score_logits=object_score_logits,
        )
        return current_out, sam_outputs, high_res_features, pix_feat

    def track(
        self,
        features: ClipFeatures,
        point_inputs: dict[str, Tensor] | None = None,
        mask_inputs: Tensor | None = None,
    ) -> TrackOutput:
        """Prompt frame 0 of every clip, then track through frames 1..T-1 with SAM-2's memory.

        ``point_inputs`` is SAM-2's point format (``point_coords`` [B, P, 2] in pixels, ``point_labels``
        [B, P] int32: 1 positive, 0 negative, 2/3 box corners, -1 padding); ``mask_inputs`` [B, 1, H, W]
        is a mask prompt (e.g. a language-prompted key-frame mask). The memory is organised as sam2's
        video predictor does: the prompted frame under ``cond_frame_outputs``, the others under
        ``non_cond_frame_outputs``.
        """
        if point_inputs is None and mask_inputs is None:
            raise ValueError("tracking needs a point/box prompt or a mask prompt on frame 0")
        outputs = self._track_prompted(features, {0: (point_inputs, mask_inputs)})
        return TrackOutput(
            logits=torch.stack([out["pred_masks_high_res"][:, 0] for out in outputs], dim=1),
            candidate_logits=[out["candidate_masks_high_res"] for out in outputs],
            candidate_ious=[out["candidate_ious"] for out in outputs],
            object_score_logits=torch.cat([out["object_score_logits"] for out in outputs], dim=1),
        )

    def track_masks(self, features: ClipFeatures, key_frames: list[int], masks: Tensor) -> Tensor:
        """Mask logits [B, T, H, W] of the object whose masks [B, K, H, W] are given on ``key_frames``
        (frame 0 among them): each key frame is a conditioning frame, the others follow by SAM-2's memory
        of every key frame and of the frames just tracked (Sa2VA-style inference)."""
        if 0 not in key_frames:
            raise ValueError(f"key frames {key_frames} must include frame 0 (tracking runs forward)")
        prompts = {frame: (None, masks[:, [index]]) for index, frame in enumerate(key_frames)}
        outputs = self._track_prompted(features, prompts)
        return torch.stack([out["pred_masks_high_res"][:, 0] for out in outputs], dim=1)

    def _track_prompted(
        self, features: ClipFeatures, prompts: dict[int, tuple[dict[str, Tensor] | None, Tensor | None]]
    ) -> list[dict]:
        """Every frame's ``track_step`` output, in frame order: the prompted frames first (point or mask
        prompts by frame), then the others in order, as sam2's video predictor adds prompts and then
        propagates. The memory is organised as it does: prompted frames under ``cond_frame_outputs``, the
        others under ``non_cond_frame_outputs``."""
        output_dict: dict[str, dict[int, dict]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        order = [*sorted(prompts), *(t for t in range(features.num_frames) if t not in prompts)]
        for index in order:
            vision_feats, vision_pos_embeds = features.frame(index)
            is_cond = index in prompts
            point_inputs, mask_inputs = prompts.get(index, (None, None))
            out = self.track_step(
                frame_idx=index,
                is_init_cond_frame=is_cond,
                current_vision_feats=vision_feats,
                current_vision_pos_embeds=vision_pos_embeds,
                feat_sizes=features.feat_sizes,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                output_dict=output_dict,
                num_frames=features.num_frames,
            )
            output_dict["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][index] = out
        return [
            output_dict["cond_frame_outputs" if t in prompts else "non_cond_frame_outputs"][t]
            for t in range(features.num_frames)
        ]

    def track_from_prompt(
        self,
        frames: Tensor,
        point_inputs: dict[str, Tensor] | None = None,
        mask_inputs: Tensor | None = None,
    ) -> Tensor:
        """Mask logits [(B,) T, H, W] of the object prompted on frame 0 of clips [(B,) T, 3, H, W].

        One clip [T, 3, H, W] takes prompts with a batch dimension of 1 and returns [T, H, W].
        """
        single = frames.ndim == _CLIP_DIMS
        clips = frames.unsqueeze(0) if single else frames
        logits = self.track(self.encode_clips(clips), point_inputs, mask_inputs).logits
        return logits[0] if single else logits


def build_sam2(
    config_name: str,
    overrides: list[str] | None = None,
    checkpoint: str | None = None,
    cache_frames: int = 0,
) -> LanguagePromptedSAM2:
    """Build SAM-2 from a ``sam2`` package Hydra config, with overrides and an optional checkpoint.

    ``config_name`` is relative to the ``sam2`` package (e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``);
    ``checkpoint`` is an official-format ``.pt`` file (a dict with a ``model`` state dict), loaded with
    ``weights_only=True``. ``cache_frames`` > 0 keeps that many frames' features while the image encoder
    is frozen (:class:`~lightning_desa2va.models.frame_cache.CachingImageEncoder`).
    """
    hydra_overrides = [f"++model._target_={SAM2_TARGET}", *(overrides or [])]
    if cache_frames:
        hydra_overrides += [
            f"++model.image_encoder._target_={CACHING_ENCODER_TARGET}",
            f"++model.image_encoder.cache_frames={cache_frames}",
        ]
    with config_module(SAM2_CONFIG_MODULE, SAM2_HYDRA_VERSION_BASE):
        cfg = compose(config_name=config_name, overrides=hydra_overrides)
    OmegaConf.resolve(cfg)
    model: LanguagePromptedSAM2 = instantiate(cfg.model, _recursive_=True)
    if checkpoint is not None:
        load_sam2_checkpoint(model, Path(checkpoint))
    return model


def load_sam2_checkpoint(model: SAM2Base, path: Path) -> None:
    """Load SAM-2 weights from an official ``.pt`` checkpoint or a ``.safetensors`` state dict.

    ``.pt`` files load with ``weights_only=True``; a file that is no such checkpoint, or whose tensors do
    not fit the configured model (another size of SAM-2), is a one-line error naming the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"SAM-2 checkpoint not found: {path}")
    state = _read_sam2_state(path)
    _check_fit(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True)
    log.info("loaded SAM-2 weights from %s", path)


def _read_sam2_state(path: Path) -> dict[str, Tensor]:
    """The state dict of a safetensors file, or of an official ``{"model": state_dict}`` ``.pt`` file."""
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return load_file(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsFormatError(f"SAM-2 checkpoint {path} cannot be read: {first_line}") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise WeightsFormatError(
            f"SAM-2 checkpoint {path} has no 'model' state dict (official format: {{'model': state_dict}})"
        )
    return payload["model"]


def _check_fit(expected: dict[str, Tensor], state: dict[str, Tensor], path: Path) -> None:
    """Name what does not fit: missing and unexpected keys and tensors of another shape (first few)."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {list(state[key].shape)} vs {list(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''})"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes differ", reshaped),
        )
        if keys
    ]
    if problems:
        raise WeightsFormatError(
            f"SAM-2 checkpoint {path} does not fit the configured model (is model.sam2.config_name the "
            f"checkpoint's size?): {'; '.join(problems)}"
        )
