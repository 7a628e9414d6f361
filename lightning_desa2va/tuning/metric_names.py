"""The names a sweep may optimise, known without importing the model stack, so that a spec's ``metric`` is
checked in the first second (with "did you mean") instead of after every trial has trained.

Validation metrics are what a stage logs as ``val/<name>``: every segmentation stage logs J, F, J&F, cIoU,
gIoU and the mask shares (:mod:`lightning_desa2va.metrics`), each overall and per expression type; stage 2
adds QA accuracy and the disentanglement diagnostics. Trial measures are what the sweep measures itself over
a trial's training (for a second objective such as speed or memory); they have no intermediate values, so
nothing prunes on them.
"""

from __future__ import annotations

import difflib

from lightning_desa2va.data.schema import EXPRESSION_TYPES

STEP_SECONDS = "step_s"
PEAK_MEMORY = "peak_memory_gb"
TRIAL_MEASURES = {
    STEP_SECONDS: "mean wall seconds of a training step (validation excluded), over the trial's stages",
    PEAK_MEMORY: "peak GPU memory allocated (CUDA) or peak resident memory sampled at every step (CPU), GB",
}
MASK_SHARE_PARTS = ("target", "lookalike", "other", "background")


def per_type(*names: str) -> set[str]:
    return {
        f"{name}{suffix}" for name in names for suffix in ("", *(f"/{kind}" for kind in EXPRESSION_TYPES))
    }


SEGMENTATION = per_type("J", "F", "JF", "cIoU", "gIoU", *(f"mask_share/{part}" for part in MASK_SHARE_PARTS))
STAGE_METRICS = {
    "text_pretrain": SEGMENTATION,
    "decoupled_finetune": SEGMENTATION
    | per_type("qa_accuracy", "diag/abs_cos_zt_zv", "diag/gate_mean", "diag/gate_std")
    | {"diag/principal_cos_max", "diag/principal_cos_mean"},
}
"""What each sweepable stage logs under ``val/`` (the test compares this with a real run's metrics)."""
KNOWN = set().union(*STAGE_METRICS.values()) | set(TRIAL_MEASURES)


def did_you_mean(name: str, known: set[str] | list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name (case and a ``val/`` prefix aside), or nothing."""
    by_lower = {option.lower(): option for option in known}
    wanted = name.lower().removeprefix("val/").removeprefix("val_")
    close = difflib.get_close_matches(wanted, sorted(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def unknown_metric(name: str, stage: str | None = None) -> str | None:
    """Why ``name`` is not a metric a sweep can read (of ``stage``, when known), or None."""
    known = KNOWN if stage is None else STAGE_METRICS.get(stage, KNOWN) | set(TRIAL_MEASURES)
    if name in known:
        return None
    where = f"stage {stage} logs" if stage else "the stages log"
    return f"'{name}' is not a metric {where} under val/ nor a trial measure{did_you_mean(name, known)}"
