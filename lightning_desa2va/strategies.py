"""What the distributed strategies (config group ``strategy``) need from the model: which modules FSDP wraps.

Lightning's ``FSDPStrategy`` takes an ``auto_wrap_policy``; a config cannot name the model's classes before
the model is built (they come with the chosen VLM), so the policy matches class names: one FSDP unit per
transformer block, the granularity at which FSDP gathers and frees parameters.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy


def block_wrap_policy(block_names: list[str]) -> CustomPolicy:
    """An FSDP policy wrapping every module whose class is named in ``block_names`` (e.g.
    ``Qwen2DecoderLayer``, SAM-2's ``MultiScaleBlock``)."""
    names = frozenset(block_names)

    def is_block(module: nn.Module) -> bool:
        return type(module).__name__ in names

    return CustomPolicy(is_block)
