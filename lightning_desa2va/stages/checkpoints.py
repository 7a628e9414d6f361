"""Loading model weights between stages, securely (``weights_only=True``) and with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_desa2va.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."


def read_model_weights(checkpoint: Path) -> dict[str, Tensor]:
    """The ``model.*`` weights of a stage's Lightning checkpoint (prefix removed), read with
    ``weights_only=True``; a missing file, a file that is no PyTorch checkpoint or one that is not a
    Lightning checkpoint (e.g. a foundation's weights) is an error naming it."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"stage checkpoint not found: {checkpoint}")
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # arbitrary bytes fail torch.load in many ways (KeyError, EOFError, ...)
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise CheckpointError(f"{checkpoint} is not a PyTorch checkpoint ({reason})") from error
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(
            f"{checkpoint} is not a Lightning checkpoint (no 'state_dict'; a foundation's weights?)"
        )
    return {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in payload["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }


def load_model_weights(model: nn.Module, checkpoint: Path, complete: bool = False) -> None:
    """Load a stage's Lightning checkpoint (its ``model.*`` weights) into ``model`` (see
    :func:`apply_model_weights`)."""
    apply_model_weights(model, read_model_weights(checkpoint), checkpoint, complete)


def apply_model_weights(
    model: nn.Module, weights: dict[str, Tensor], checkpoint: Path, complete: bool = False
) -> None:
    """Load ``weights`` read from ``checkpoint`` into ``model``.

    Modules the checkpoint lacks keep their fresh initialisation (e.g. a fusion stage 1 never used) and
    are logged, unless ``complete`` (the checkpoint must hold every weight: a trained model to run, not a
    start); weights the model cannot take are an error naming the checkpoint and the keys.
    """
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise CheckpointError(
            f"{checkpoint} holds weights this model does not have (a checkpoint of another stage or "
            f"model?): {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    if missing and complete:
        raise CheckpointError(
            f"{checkpoint} lacks {len(missing)} weights of the configured model (e.g. {missing[:3]}): "
            "a checkpoint of another stage or model?"
        )
    if missing:
        log.info("weights not in %s keep their initialisation: %s", checkpoint, missing)
    log.info("initialised the model from %s", checkpoint)
