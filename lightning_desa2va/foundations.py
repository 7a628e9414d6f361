"""Tiny pretrained foundations: export a pretraining run's SAM-2 and VLM as shipped files, and check them.

The embedded default, like the real pipeline, starts from pretrained foundations. ``make pretrain-tiny``
trains them with the framework's own recipes (``stage=sam2_pretrain`` and ``stage=vlm_pretrain``) and
writes ``sam2.safetensors``, ``vlm.safetensors`` and ``manifest.json`` (recipe, resolved config, seed,
metrics, sha256 and size of each file). :func:`verify_foundations` refuses files that do not match it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from lightning_desa2va.config import SHIPPED_FOUNDATIONS_DIR

MANIFEST_NAME = "manifest.json"
SAM2_WEIGHTS = "sam2.safetensors"
VLM_WEIGHTS = "vlm.safetensors"
SHIPPED_DIR = SHIPPED_FOUNDATIONS_DIR
HASH_CHUNK_BYTES = 1 << 20


class FoundationMismatchError(ValueError):
    """A shipped weights file differs from what its manifest records."""


@dataclass
class Phase:
    """One training run of a foundation's recipe: its overrides, resolved config, seed and final metrics."""

    stage: str
    overrides: list[str]
    config: dict[str, Any]
    seed: int
    metrics: dict[str, float]


@dataclass
class Recipe:
    """How one foundation was made: its phases in order; the last phase's metrics are the foundation's."""

    phases: list[Phase]

    @property
    def metrics(self) -> dict[str, float]:
        return self.phases[-1].metrics

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "phases": [vars(phase) for phase in self.phases]}


def export_weights(module: nn.Module, path: Path) -> Path:
    """Write ``module``'s weights as safetensors (shared tensors, e.g. tied embeddings, stored once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(module, str(path))
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: Path, recipes: dict[str, Recipe], weights: dict[str, Path]) -> Path:
    """Record each foundation's recipe and the sha256 and size of every weights file in ``out_dir``."""
    manifest = {
        "recipes": {name: recipe.to_json() for name, recipe in recipes.items()},
        "files": {
            path.name: {"sha256": sha256_of(path), "bytes": path.stat().st_size} for path in weights.values()
        },
    }
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(weights_dir: Path = SHIPPED_DIR) -> dict[str, Any]:
    path = weights_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no foundations manifest at {path} (run `make pretrain-tiny`)")
    return json.loads(path.read_text())


def verify_foundations(weights_dir: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Check every file the manifest lists: present, same size, same sha256. Returns the manifest."""
    manifest = read_manifest(weights_dir)
    for name, expected in manifest["files"].items():
        path = weights_dir / name
        if not path.is_file():
            raise FoundationMismatchError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            raise FoundationMismatchError(f"{path} does not match its manifest entry (size or sha256)")
    return manifest
