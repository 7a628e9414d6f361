"""Files written whole or not at all: to a temporary name beside the target, then renamed (a rename within one
folder is atomic), so an interrupted or failed write leaves the previous file as it was."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".partial"


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the result onto ``path`` in one rename (same folder, so the
    same file system); on failure the temporary file goes and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """``path.write_text(text)``, but whole or not at all (run records, configs, study files)."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text))
