"""What a stage checkpoint keeps, and loading one into a model with one-line errors.

A stage checkpoint keeps the weights a run changed and nothing it can rebuild: every trainable tensor (LoRA,
the ``[SEG]`` row, SAM-2's mask decoder, ...), every DeSa2VA module (outside the foundations ``vlm`` and
``sam``) and whatever ``stage.init_from`` loaded, but not the frozen foundation weights, which come again
from the base the model is built from (the VLM folder, the SAM-2 checkpoint, the shipped foundations). A
2B VLM with SAM-2-L is ~9 GB of fp32 weights; its stage-2 checkpoint holds what LoRA and the heads add.
The checkpoint records which model keys it left out and the overrides that build the model it fits
(``desa2va`` entry, :class:`CheckpointRecord`), so loading can tell a left-out key from a missing one and
a checkpoint of another model is one line naming the first key that does not fit and the overrides that
would. Everything loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_desa2va.errors import CheckpointError

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
RECORD_KEY = "desa2va"
"""Where a Lightning checkpoint holds its :class:`CheckpointRecord`."""
FOUNDATIONS = ("vlm.", "sam.")
"""Model parts built from a base (folder, checkpoint, foundations) that rebuilds their frozen weights."""
MODEL_KEYS = (
    "experiment",
    "model",
    "decoupler",
    "text_prompt",
    "visual_prompt",
    "fusion",
    "motion_cue",
    "motion_prompt",
    "paths.weights_dir",
    "paths.foundations_dir",
)
"""Override keys (and their sub-keys) that decide which model a checkpoint fits."""
SCORE_PREFIXES = ("val/", "test/")
EXPORT_MANIFEST = "desa2va.json"
EXPORT_MODULES = "desa2va.safetensors"


@dataclass
class CheckpointRecord:
    """What a checkpoint says about its weights (stored under ``desa2va`` in the Lightning checkpoint)."""

    rebuilt: list[str] = field(default_factory=list)
    """Model keys left out for the model's base to rebuild (a key ending in ``.``: every key under it)."""
    model_overrides: list[str] = field(default_factory=list)
    """The overrides that build the model this checkpoint fits (``model=...``, ``model.folder=...``, ...)."""
    run_overrides: list[str] = field(default_factory=list)
    """Every override of the run that saved it."""
    scores: dict[str, float] = field(default_factory=dict)
    """The val/test scores logged when it was saved."""

    def is_rebuilt(self, key: str) -> bool:
        return key in self._rebuilt or any(key.startswith(p) for p in self.rebuilt if p.endswith("."))

    def __post_init__(self) -> None:
        self._rebuilt = set(self.rebuilt)

    def hint(self) -> str:
        """What to add to the command line to build the model this checkpoint fits."""
        if not self.model_overrides:
            return ""
        return f"; it was saved from a model built with: {' '.join(self.model_overrides)}"


@dataclass
class StageWeights:
    """The model weights of a stage checkpoint (``model.`` removed) and what it says about them."""

    path: Path
    tensors: dict[str, Tensor]
    record: CheckpointRecord


def model_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides among ``overrides`` that decide the model (see :data:`MODEL_KEYS`)."""
    chosen = []
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if any(key == name or key.startswith(f"{name}.") for name in MODEL_KEYS):
            chosen.append(override)
    return chosen


def trainable_only(
    model: nn.Module, state_dict: dict[str, Any], initialised: Iterable[str], prefix: str = MODEL_PREFIX
) -> list[str]:
    """Drop from a LightningModule's ``state_dict`` the frozen foundation weights of ``model`` (stored under
    ``prefix``) that ``initialised`` (keys a checkpoint loaded into it) does not name; the dropped model
    keys, which the model's base rebuilds."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    keep = trainable | set(initialised)
    dropped = [
        key
        for key in model.state_dict()
        if key.startswith(FOUNDATIONS) and key not in keep and f"{prefix}{key}" in state_dict
    ]
    for key in dropped:
        del state_dict[f"{prefix}{key}"]
    return dropped


def scores_of(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The val and test figures among logged metrics, as floats."""
    return {name: float(value) for name, value in metrics.items() if name.startswith(SCORE_PREFIXES)}


def read_model_weights(checkpoint: Path) -> StageWeights:
    """The model weights of a stage's Lightning checkpoint (or of a ``desa2va export`` folder), read with
    ``weights_only=True``; a missing file, a file that is no PyTorch checkpoint or one that is not a
    Lightning checkpoint (e.g. a foundation's weights) is an error naming it."""
    checkpoint = Path(checkpoint)
    if (checkpoint / EXPORT_MANIFEST).is_file():
        return _read_export(checkpoint)
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
    tensors = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in payload["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    return StageWeights(checkpoint, tensors, CheckpointRecord(**payload.get(RECORD_KEY, {})))


def _read_export(folder: Path) -> StageWeights:
    """An export folder: its DeSa2VA modules; the VLM and SAM-2 are built from the folder itself."""
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    record = CheckpointRecord(
        rebuilt=list(FOUNDATIONS),
        model_overrides=model_overrides(manifest["overrides"]),
        run_overrides=manifest["overrides"],
        scores=manifest.get("scores", {}),
    )
    return StageWeights(folder, load_file(folder / EXPORT_MODULES), record)


def export_overrides(checkpoint: Path) -> list[str]:
    """The overrides that build the model of a ``desa2va export`` folder from it (none for a checkpoint)."""
    manifest = Path(checkpoint) / EXPORT_MANIFEST
    return list(json.loads(manifest.read_text())["overrides"]) if manifest.is_file() else []


def load_model_weights(model: nn.Module, checkpoint: Path, complete: bool = False) -> set[str]:
    """Load a stage's checkpoint into ``model`` (see :func:`apply_model_weights`); the keys it loaded."""
    return apply_model_weights(model, read_model_weights(checkpoint), complete)


def apply_model_weights(model: nn.Module, weights: StageWeights, complete: bool = False) -> set[str]:
    """Load ``weights`` into ``model``; the keys loaded.

    Keys the checkpoint left out for the base to rebuild keep what the model was built with; other keys it
    lacks keep their fresh initialisation (e.g. a fusion stage 1 never used, logged) unless ``complete``
    (a trained model to run, not a start). A key the model does not have, a tensor of another shape, or
    (``complete``) a key neither saved nor rebuilt is one line naming the checkpoint, the first such key and
    the overrides that build the model the checkpoint fits.
    """
    expected = model.state_dict()
    where, hint = weights.path, weights.record.hint()
    for key, value in weights.tensors.items():
        if key not in expected:
            raise CheckpointError(
                f"{where} does not fit the configured model: it holds {key}, which the model does not have "
                f"(a checkpoint of another stage or model?){hint}"
            )
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{where} does not fit the configured model: {key} is {list(value.shape)} in the checkpoint, "
                f"{list(expected[key].shape)} in the model{hint}"
            )
    missing = [key for key in expected if key not in weights.tensors and not weights.record.is_rebuilt(key)]
    if missing and complete:
        raise CheckpointError(
            f"{where} does not fit the configured model: it lacks {len(missing)} of its weights, first "
            f"{missing[0]} (a checkpoint of another stage or model?){hint}"
        )
    model.load_state_dict(weights.tensors, strict=False)
    if missing:
        log.info("weights not in %s keep their initialisation: %s", where, missing)
    log.info("initialised the model from %s", where)
    return set(weights.tensors)


def record_of(rebuilt: list[str], overrides: list[str], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The ``desa2va`` entry of a checkpoint (see :class:`CheckpointRecord`)."""
    return asdict(CheckpointRecord(rebuilt, model_overrides(overrides), list(overrides), scores_of(metrics)))
