"""Loading model weights between stages, securely (``weights_only=True``) and with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a stage's Lightning checkpoint (its ``model.*`` weights) into ``model``.

    Modules the checkpoint lacks keep their fresh initialisation (e.g. a fusion stage 1 never used) and
    are logged; weights the model cannot take are an error naming the checkpoint and the keys.
    """
    if not checkpoint.is_file():
        raise FileNotFoundError(f"stage checkpoint not found: {checkpoint}")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" not in payload:
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no 'state_dict')")
    weights = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in payload["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"{checkpoint} holds weights this model does not have: {unexpected[:8]}")
    if missing:
        log.info("weights not in %s keep their initialisation: %s", checkpoint, missing)
    log.info("initialised the model from %s", checkpoint)
