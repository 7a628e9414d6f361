"""SAM-2 from the ``sam2`` package, extended so that language prompts enter its mask decoder.

The model is the package's own :class:`~sam2.modeling.sam2_base.SAM2Base`, built from its packaged Hydra
configs (with size overrides for the tiny default) and optionally loaded from an official ``.pt``
checkpoint. :class:`LanguagePromptedSAM2` only adds the two calls the DeSa2VA pipeline needs: encode a
batch of frames once, then decode masks from arbitrary sparse prompt embeddings (the projected ``[SEG]``
state, point prompts, or both), as Sa2VA feeds its language embedding to SAM-2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.config import config_module

log = logging.getLogger(__name__)

SAM2_TARGET = "lightning_desa2va.models.sam2.LanguagePromptedSAM2"
SAM2_CONFIG_MODULE = "sam2"
SAM2_HYDRA_VERSION_BASE = "1.2"  # what the sam2 package itself initialises with


@dataclass
class FrameFeatures:
    """Image features of a batch of frames, computed once and decoded against several prompts."""

    image_embeddings: Tensor  # [N, C, h, w], lowest resolution level with ``no_mem_embed`` added
    high_res_features: list[Tensor]  # the two finer levels, already projected by the mask decoder


@dataclass
class MaskPrediction:
    """Mask logits at image resolution and SAM-2's own IoU estimate for them."""

    logits: Tensor  # [N, 1, image_size, image_size]
    iou: Tensor  # [N, 1]


class LanguagePromptedSAM2(SAM2Base):
    """SAM-2 whose mask decoder also takes language-derived sparse prompt embeddings."""

    @property
    def prompt_dim(self) -> int:
        """Width C of SAM-2's prompt tokens: the size every language prompt is projected to."""
        return self.sam_prompt_embed_dim

    def encode_frames(self, frames: Tensor) -> FrameFeatures:
        """Run the image encoder on ``frames`` [N, 3, H, W] (normalised as SAM-2 expects)."""
        backbone_out = self.forward_image(frames)
        _, vision_feats, _, feat_sizes = self._prepare_backbone_features(backbone_out)
        # Frames decoded without memory get the learned "no memory" embedding, as SAM-2 does itself.
        vision_feats[-1] = vision_feats[-1] + self.no_mem_embed
        maps = [
            feat.permute(1, 2, 0).reshape(feat.shape[1], feat.shape[2], *size)
            for feat, size in zip(vision_feats, feat_sizes, strict=True)
        ]
        return FrameFeatures(image_embeddings=maps[-1], high_res_features=maps[:-1])

    def decode_prompts(self, features: FrameFeatures, sparse_prompts: Tensor) -> MaskPrediction:
        """Decode one mask per frame from sparse prompt embeddings [N, K, C]."""
        num_frames = features.image_embeddings.shape[0]
        if sparse_prompts.shape[0] != num_frames or sparse_prompts.shape[-1] != self.prompt_dim:
            raise ValueError(
                f"sparse prompts of shape {tuple(sparse_prompts.shape)} do not fit {num_frames} frames "
                f"and SAM-2 prompt width {self.prompt_dim}"
            )
        _, dense = self.sam_prompt_encoder(points=None, boxes=None, masks=None)
        low_res, iou, _, _ = self.sam_mask_decoder(
            image_embeddings=features.image_embeddings,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_prompts.to(features.image_embeddings.dtype),
            dense_prompt_embeddings=dense.expand(num_frames, -1, -1, -1),
            multimask_output=False,
            repeat_image=False,
            high_res_features=features.high_res_features,
        )
        logits = F.interpolate(
            low_res.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        return MaskPrediction(logits=logits, iou=iou.float())

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """Encode point prompts (pixel coordinates [N, P, 2], labels [N, P]) with SAM-2's prompt encoder."""
        return self.sam_prompt_encoder._embed_points(coords, labels, pad=False)


def build_sam2(
    config_name: str,
    overrides: list[str] | None = None,
    checkpoint: str | None = None,
) -> LanguagePromptedSAM2:
    """Build SAM-2 from a ``sam2`` package Hydra config, with overrides and an optional checkpoint.

    ``config_name`` is relative to the ``sam2`` package (e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``);
    ``checkpoint`` is an official-format ``.pt`` file (a dict with a ``model`` state dict), loaded with
    ``weights_only=True``.
    """
    hydra_overrides = [f"++model._target_={SAM2_TARGET}", *(overrides or [])]
    with config_module(SAM2_CONFIG_MODULE, SAM2_HYDRA_VERSION_BASE):
        cfg = compose(config_name=config_name, overrides=hydra_overrides)
    OmegaConf.resolve(cfg)
    model: LanguagePromptedSAM2 = instantiate(cfg.model, _recursive_=True)
    if checkpoint is not None:
        load_sam2_checkpoint(model, Path(checkpoint))
    return model


def load_sam2_checkpoint(model: SAM2Base, path: Path) -> None:
    """Load an official SAM-2 ``.pt`` checkpoint, naming the file and the keys when they do not fit."""
    if not path.is_file():
        raise FileNotFoundError(f"SAM-2 checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"SAM-2 checkpoint {path} has no 'model' state dict (official format expected)")
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"SAM-2 checkpoint {path} does not fit the configured model: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    log.info("loaded SAM-2 weights from %s", path)
