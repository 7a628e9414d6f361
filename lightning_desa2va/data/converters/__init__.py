"""Converters from the layouts the real datasets ship in to shards of the sample schema
(``desa2va shards build``; docs/data.md lists the layouts and commands). This module stays light (the
CLI reads its format names); :func:`~lightning_desa2va.data.converters.build.build_shards` converts.

Real datasets label no expression with static / motion / mixed, so each gets its dataset's type
(:data:`DATASET_TYPES`): MeViS was built from motion expressions, RefCOCO's images admit no motion, the
others mix appearance and action without saying which. Objects carry no attribute words (``""``) and
expressions no structured ``attributes``: nothing is invented.
"""

from __future__ import annotations

DATASET_TYPES = {
    "mevis": "motion",
    "revos": "mixed",
    "refytvos": "mixed",
    "davis17": "mixed",
    "refcoco": "static",
}
"""Expression type of every expression of a dataset (see the module docstring)."""

FORMATS = tuple(DATASET_TYPES)
DEFAULT_VIDEOS_PER_SHARD = 50
"""Videos per shard: ~50-400 MB of 720p MeViS clips, and enough shards for ranks x workers."""
