"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) as the VLM whose ``[SEG]`` state prompts SAM-2.

Qwen-VL reads an image as flattened 14-pixel patches with its grid (``image_grid_thw``) and places its
tokens with 3-D rotary positions that need to know which tokens are image tokens (``mm_token_type_ids``).
The data pipeline hands every VLM frames [B * T, 3, s, s] normalised with ``data.pixel_mean/std``, so this
wrapper undoes that normalisation and lets the checkpoint's own image processor (no resize: the frames are
already s × s) normalise and patch them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoImageProcessor, BaseImageProcessor, PreTrainedModel, PreTrainedTokenizerBase

from lightning_desa2va.errors import WeightsFormatError
from lightning_desa2va.models.tokenizer import SEG_TOKEN
from lightning_desa2va.models.vlm import SegTokenVLM, load_image_text_model

IMAGE_TOKEN_TYPE = 1  # mm_token_type_ids: 0 text, 1 image, 2 video


class QwenSegTokenVLM(SegTokenVLM):
    """A Qwen-VL model whose frames go through its image processor before its forward pass."""

    def __init__(
        self,
        model: PreTrainedModel,
        seg_token_id: int,
        image_size: int,
        image_tokens: int,
        image_processor: BaseImageProcessor,
        pixel_mean: list[float],
        pixel_std: list[float],
    ) -> None:
        super().__init__(model, seg_token_id, image_size, image_tokens)
        self.image_processor = image_processor
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def vision_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> dict[str, Tensor | None]:
        """Patches, grid and image-token types of frames [N, 3, s, s], as Qwen-VL's processor makes them."""
        if pixel_values is None:
            return {}
        rgb = (pixel_values.float() * self.pixel_std + self.pixel_mean).clamp(0, 1)
        images = self.image_processor(
            images=rgb, do_resize=False, do_rescale=False, return_tensors="pt", device=pixel_values.device
        )
        return {
            "pixel_values": images["pixel_values"].to(pixel_values.device, pixel_values.dtype),
            "image_grid_thw": images["image_grid_thw"].to(pixel_values.device),
            "mm_token_type_ids": (input_ids == self.model.config.image_token_id).int() * IMAGE_TOKEN_TYPE,
        }


def load_qwen2_5_vl(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    pixel_mean: list[float],
    pixel_std: list[float],
    train_tokens: list[str] | None = None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> QwenSegTokenVLM:
    """Load a local Qwen2.5-VL folder (``local_files_only``) for frames of ``image_size`` pixels a side,
    which the data normalised with ``pixel_mean`` / ``pixel_std``; ``train_tokens`` as for InternVL."""
    model = load_image_text_model(path, tokenizer, dtype, gradient_checkpointing)
    image_processor = AutoImageProcessor.from_pretrained(Path(path), local_files_only=True)
    side = image_processor.patch_size * image_processor.merge_size
    if image_size % side:
        raise WeightsFormatError(
            f"model.vlm.image_size={image_size} is not a multiple of {side} ({path}'s patch size "
            f"{image_processor.patch_size} x merge size {image_processor.merge_size})"
        )
    image_tokens = (image_size // side) ** 2
    vlm = QwenSegTokenVLM(
        model,
        tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        image_size,
        image_tokens,
        image_processor,
        pixel_mean,
        pixel_std,
    )
    vlm.trainable_token_ids = tokenizer.convert_tokens_to_ids(list(train_tokens or []))
    return vlm
