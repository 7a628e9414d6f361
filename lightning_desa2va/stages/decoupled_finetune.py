"""Stage 2, decoupled fine-tuning (``stage=decoupled_finetune``).

Frames and the expression go through the VLM (language model adapted with LoRA); the ``[SEG]`` state is
decoupled into z_t and z_v, each prompts SAM-2, the two masks are fused, and the triple supervision (plus
the orthogonality and LM terms) trains it. The model starts from a stage-1 checkpoint (``init_from``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.losses import LossTerms, TripleSupervisionLoss
from lightning_desa2va.models.desa2va import DeSa2VA, DeSa2VAOutput
from lightning_desa2va.stages.base import Optimizer, SegmentationStage
from lightning_desa2va.stages.checkpoints import load_model_weights

log = logging.getLogger(__name__)

LORA_PARAMETER_TAG = "lora_"


class DecoupledFinetuneStage(SegmentationStage):
    """Expression + frames → decoupled [SEG] → text, visual and fused masks; triple supervision."""

    label = "stage 2 (fused mask)"

    def __init__(
        self,
        model: DeSa2VA,
        loss: TripleSupervisionLoss,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
        lora: LoraConfig | None = None,
        init_from: str | None = None,
        propagate: bool = False,
        w_motion: float = 0.0,
        motion_grid: int = 32,
    ) -> None:
        super().__init__(model, optimizer, train_modules, num_overlays, w_motion, motion_grid)
        self.loss = loss
        self.propagate = propagate
        if init_from is not None:
            load_model_weights(model, Path(init_from))
        if lora is not None:
            inject_adapter_in_model(lora, model.vlm.language_model)
        self.select_trainable(extra=(LORA_PARAMETER_TAG,) if lora is not None else ())

    def forward_batch(self, batch: dict[str, Any]) -> DeSa2VAOutput:
        return self.model(
            batch["frames"],
            batch["vlm_pixels"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"] if self.loss.uses_lm else None,
        )

    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        """Fused masks on every frame, or (``propagate``) on the key frame then tracked by SAM-2's memory."""
        fused = self.forward_batch(batch).fused_logits
        return self.model.propagate(batch["frames"], fused[:, 0]) if self.propagate else fused

    def compute_losses(self, batch: dict[str, Any]) -> tuple[DeSa2VAOutput, LossTerms]:
        """The model's output for a batch and every loss term on it (what a training step minimises)."""
        output = self.forward_batch(batch)
        penalty = (
            self.model.decoupler.orthogonality_penalty(output.embeddings) if self.loss.uses_orth else None
        )
        return output, self.loss(output, batch["target_masks"], penalty, batch["stated_motion"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output, losses = self.compute_losses(batch)
        self.log_dict(self.diagnostics(output), batch_size=len(batch["expression"]))
        return self.log_losses(losses, self.motion_objective(output.image_embeddings, batch), batch)

    @torch.no_grad()
    def diagnostics(self, output: DeSa2VAOutput) -> dict[str, Tensor]:
        """How decoupled z_t and z_v are, and how the fusion gate leans (DESIGN: logged with every run)."""
        cosine = F.cosine_similarity(output.embeddings.text, output.embeddings.visual, dim=-1).abs().mean()
        stats = {"diag/abs_cos_zt_zv": cosine}
        if output.gate is not None:
            stats["diag/gate_mean"] = output.gate.mean()
            stats["diag/gate_std"] = output.gate.std()
        return stats
