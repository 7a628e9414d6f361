"""What the distributed strategies (config group ``strategy``) need from the model (which modules FSDP wraps)
and the data (validation of uneven shares under DDP), and a check that the configured accelerator exists on
this machine.

Lightning's ``FSDPStrategy`` takes an ``auto_wrap_policy``; a config cannot name the model's classes before
the model is built (they come with the chosen VLM), so the policy matches class names: one FSDP unit per
transformer block, the granularity at which FSDP gathers and frees parameters. ``strategy=ddp`` is
Lightning's ``DDPStrategy`` with validation that tolerates ranks with different numbers of batches.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
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


class UnevenEvaluationDDPStrategy(DDPStrategy):
    """DDP whose validation during ``fit`` calls the LightningModule itself rather than its DDP wrapper.

    Validation scores each rank's share of every shard's samples (every world-size-th), so one rank may run
    a batch more than another, or none at all. Through the wrapper each forward first broadcasts the
    module's buffers, a collective the rank that has finished never joins: the run hangs. Evaluation syncs
    no gradients, and ``trainer.validate`` / ``trainer.test`` call the module unwrapped already."""

    def validation_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        with self.precision_plugin.val_step_context():
            return self.lightning_module.validation_step(*args, **kwargs)


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


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` names explicitly (a count, a list or ``"0,1"``); ``None`` for
    ``auto`` / -1, which depend on the machine."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return int(text) if text.isdigit() else None


def check_strategy(strategy: Any, devices: Any, num_nodes: int) -> None:
    """Several devices or nodes under ``strategy=auto`` stop in one line: Lightning would pick its plain DDP,
    which hangs when ranks score different numbers of validation batches (see
    :class:`UnevenEvaluationDDPStrategy`)."""
    count = device_count(devices)
    if strategy == "auto" and ((count or 1) > 1 or num_nodes > 1):
        raise ConfigError(
            f"trainer.devices={devices} trainer.num_nodes={num_nodes} with strategy=auto: choose "
            "strategy=ddp (or fsdp, deepspeed_zero2) for several devices or nodes"
        )
