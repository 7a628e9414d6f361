"""The data errors, and the reasons by which skipped data is counted (readers and converters alike)."""

from __future__ import annotations

from typing import Any

SKIP_REASONS = (
    "truncated_tar",
    "bad_meta",
    "frame_count_mismatch",
    "missing_frame",
    "missing_mask",
    "object_without_mask",
    "corrupt_jpeg",
    "corrupt_png",
    "size_mismatch",
)
"""Why a sample (reader) or a source item (converter) is skipped; the keys of the skip counts."""


class ShardFormatError(ValueError):
    """A shard, a sample or a source file does not follow its layout (the message names it).

    ``reason`` (one of :data:`SKIP_REASONS`) is what ``data.on_error=skip`` counts it under.
    """

    def __init__(self, message: str, reason: str = "bad_meta", shard: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.shard = shard
        """The shard a ``truncated_tar`` error is about."""

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.reason, self.shard)


class SchemaVersionError(ShardFormatError):
    """Shards of another schema version: a whole data set to rewrite, never skipped sample by sample."""
