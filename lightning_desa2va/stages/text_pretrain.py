"""Stage 1, text pre-training (``stage=text_pretrain``).

The ground-truth label text alone goes through the VLM's language model; its ``[SEG]`` state becomes z_t
(the decoupler's text branch), point prompts for SAM-2 and a text mask, trained with the hybrid mask loss.
What it learns (text branch, text prompt head, mask decoder) is what stage 2 starts from.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_desa2va.losses import TripleSupervisionLoss
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.stages.base import Optimizer, SegmentationStage


class TextPretrainStage(SegmentationStage):
    """Label text → point prompts → SAM-2 → text mask; hybrid mask loss."""

    label = "stage 1 (text mask)"

    def __init__(
        self,
        model: DeSa2VA,
        loss: TripleSupervisionLoss,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
    ) -> None:
        super().__init__(model, optimizer, train_modules, num_overlays)
        self.mask_loss = loss.mask
        self.select_trainable()

    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        logits, _ = self.model.segment_text(
            batch["frames"], batch["label_input_ids"], batch["label_attention_mask"]
        )
        return logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.check_finite(self.mask_loss(self.predict_logits(batch), batch["target_masks"]), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["expression"]))
        return loss
