"""The ranges of the config values a user can mistype, declared once beside the run config's schema
(:mod:`lightning_desa2va.config`), which checks them at compose time: steps and sizes positive, loss weights
finite and non-negative, probabilities in [0, 1]. A key that is missing or null is not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """The range of the numbers at the config keys matching ``pattern`` (dotted; ``*`` is one key)."""

    pattern: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def matches(self, key: str) -> bool:
        return re.fullmatch(re.escape(self.pattern).replace(r"\*", r"[^.]+"), key) is not None

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE, NON_NEGATIVE, PROBABILITY = {"low": 0, "low_open": True}, {"low": 0}, {"low": 0, "high": 1}
VALUE_BOUNDS = (
    Bound("trainer.max_steps", low=1),
    Bound("trainer.val_check_interval", **POSITIVE),
    Bound("trainer.log_every_n_steps", low=1),
    Bound("trainer.accumulate_grad_batches", low=1),
    Bound("trainer.gradient_clip_val", **NON_NEGATIVE),
    Bound("trainer.num_nodes", low=1),
    Bound("trainer.callbacks.checkpoint.every_n_train_steps", low=1),
    Bound("trainer.callbacks.divergence.factor", low=1, low_open=True),
    Bound("trainer.callbacks.divergence.smoothing", low=0, high=1, low_open=True),
    Bound("data.batch_size", low=1),
    Bound("data.eval_batch_size", low=1),
    Bound("data.num_frames", low=1),
    Bound("data.num_workers", **NON_NEGATIVE),
    Bound("data.shuffle_buffer", **NON_NEGATIVE),
    Bound("data.samples_per_epoch", low=1),
    Bound("loss.w_*", **NON_NEGATIVE),
    Bound("loss.mask.w_*", **NON_NEGATIVE),
    Bound("loss.mask.num_points", **NON_NEGATIVE),
    Bound("loss.mask.oversample_ratio", low=1),
    Bound("loss.mask.importance_sample_ratio", **PROBABILITY),
    Bound("stage.w_*", **NON_NEGATIVE),
    Bound("stage.optimizer.lr", **POSITIVE),
    Bound("stage.optimizer.weight_decay", **NON_NEGATIVE),
    Bound("stage.lora.r", low=1),
    Bound("stage.lora.lora_alpha", **POSITIVE),
    Bound("stage.lora.lora_dropout", low=0, high=1, high_open=True),
    Bound("stage.num_overlays", **NON_NEGATIVE),
    Bound("stage.prompts.prob_*", **PROBABILITY),
    Bound("stage.prompts.box_jitter", **NON_NEGATIVE),
    Bound("stage.prompts.max_positive_points", low=1),
    Bound("stage.prompts.max_negative_points", **NON_NEGATIVE),
    Bound("decoupler.dropout", low=0, high=1, high_open=True),
    Bound("eval.key_frames", low=1),
    Bound("model.sam2.cache_frames", **NON_NEGATIVE),
    Bound("data.keep_frames", **NON_NEGATIVE),
    Bound("seed", **NON_NEGATIVE),
    Bound("num_threads", low=1),
    Bound("synthetic.videos.*", low=1),
    Bound("synthetic.videos_per_shard", low=1),
)


def bound_violation(container: dict[str, Any]) -> str | None:
    """One line naming the first key of a resolved config whose number is not finite or out of its range."""
    for key, value in _numbers(container, ""):
        for bound in VALUE_BOUNDS:
            if not bound.matches(key):
                continue
            if not math.isfinite(value):
                return f"config key '{key}' is {value}: it must be a finite number {bound.describe()}"
            if not bound.holds(value):
                return f"config key '{key}' is {value!r}: it must be {bound.describe()}"
    return None


def _numbers(node: Any, path: str) -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every int or float leaf (not bool) of a resolved config container."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield path, node
