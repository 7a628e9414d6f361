"""Checkpoint files that are whole or absent, and read safely.

Lightning's own writer stages a checkpoint through fsspec, whose local temporary file may sit on another
file system (``/tmp``): the final move is then a copy, and a full disk leaves half a checkpoint under the real
name. :class:`AtomicCheckpointIO` writes beside the target and renames, so ``last.ckpt`` is always the
previous complete checkpoint or the new complete one. :func:`read_checkpoint` loads with ``weights_only=True``
whatever the environment says (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only changes loads that do not ask), and
names a truncated or foreign file in one line.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_desa2va.errors import CheckpointError
from lightning_desa2va.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, written to a temporary file beside the target and renamed.

    A write that fails (a full disk) leaves the previous checkpoint in place and stops with one line naming
    the file; remote paths (``s3://`` ...) keep Lightning's own handling.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_write(Path(path), lambda temporary: torch.save(checkpoint, temporary))
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {error.strerror or error}; the previous one is kept"
            ) from error


def is_local(path: _PATH) -> bool:
    return get_filesystem(str(path)).protocol in ("file", ("file", "local"))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True``; a missing, truncated or foreign file (one
    holding arbitrary pickled objects) is an error naming it, in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} {problem}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects that safe loading (weights_only=True) refuses ({refused_object(error)}): "
            "not a checkpoint this project wrote; refused"
        ) from error
    except Exception as error:  # arbitrary bytes fail torch.load in many ways (KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {first_line(error)})"
        ) from error
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return payload


def checkpoint_problem(path: Path) -> str | None:
    """Why a file cannot be a whole checkpoint, from its container alone (``None`` when it may be one):
    ``torch.save`` writes a zip archive, whose directory sits at its end, so a cut file has none."""
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as handle:
        starts_as_zip = handle.read(2) == b"PK"
    if starts_as_zip:
        size = path.stat().st_size
        return f"is truncated ({size} bytes, without the zip directory that ends a whole checkpoint)"
    return "is not a PyTorch checkpoint (not a zip archive)"


def refused_object(error: BaseException) -> str:
    """What torch's safe unpickler refused, from its message (which otherwise advises unsafe loading)."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return lines[0].rstrip(".") if lines else "an object it does not allow"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
