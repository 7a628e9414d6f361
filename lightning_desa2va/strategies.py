"""What the distributed strategies (config group ``strategy``) need from the model (which modules FSDP wraps),
and a check that the configured accelerator exists on this machine.

Lightning's ``FSDPStrategy`` takes an ``auto_wrap_policy``; a config cannot name the model's classes before
the model is built (they come with the chosen VLM), so the policy matches class names: one FSDP unit per
transformer block, the granularity at which FSDP gathers and frees parameters.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from lightning_desa2va.config import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


def block_wrap_policy(block_names: list[str]) -> CustomPolicy:
    """An FSDP policy wrapping every module whose class is named in ``block_names`` (e.g.
    ``Qwen2DecoderLayer``, SAM-2's ``MultiScaleBlock``)."""
    names = frozenset(block_names)

    def is_block(module: nn.Module) -> bool:
        return type(module).__name__ in names

    return CustomPolicy(is_block)


def check_accelerator(accelerator: str) -> None:
    """A GPU config on a machine torch sees no GPU on stops in one line naming the key (Lightning's own
    message, "No supported gpu backend found!", says neither which setting asked nor what to do)."""
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        raise ConfigError(
            f"trainer.accelerator is {accelerator!r} but torch sees no CUDA GPU on this machine{shown}: "
            "use trainer=cpu here, or run on a GPU machine"
        )
