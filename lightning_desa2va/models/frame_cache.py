"""SAM-2's image encoder, keeping each frame's features while its weights are frozen.

Why: every stage but SAM-2's own pre-training freezes the image encoder, yet on the tiny default it is about
half of a stage-1 step and a third of a stage-2 step, and training meets each frame many times (the demo's
400 training videos hold 3,200 frames; its 2,000 steps encode ~44,000). With ``cache_frames`` = N > 0 the
encoder keeps the features of the N frames used last and encodes only frames it has not kept, one at a
time:

    features(x) = cache[key(x)] if key(x) in cache else ImageEncoder(x)

where key(x) is a digest of the frame's bytes (with its device and dtype): equal pixels give the frozen
encoder's equal features, whatever the data set. One at a time because the encoder's results differ in the
last bits with the batch size: a frame's features must not depend on which frames it was first met with, or
a resumed run (whose cache starts empty) would not repeat the uninterrupted one. The cache is bypassed (and
emptied) while any encoder weight trains or the input needs a gradient, in training mode when the encoder is
stochastic (drop path, dropout), and emptied when weights are loaded. A frame's features cost 4 bytes ×
d_model × the cells of the kept levels (tiny default: 344 KB; Hiera-L at 1024 px: ~88 MB). Off by default:
in the demo at two threads it saves 14% of stage 1 but nothing in stage 2, whose 500 steps meet a quarter of
their frames for the first time, each encoded alone at 2.2× its cost in a batch (docs/findings.md).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from sam2.modeling.backbones.image_encoder import ImageEncoder
from sam2.modeling.sam2_utils import DropPath
from torch import Tensor, nn

DIGEST_BYTES = 16
FrameKey = tuple[str, str, bytes]
"""A frame's device, dtype and digest."""
Placement = tuple[str, str]
"""A device and a dtype."""


def frame_keys(frames: Tensor) -> list[FrameKey]:
    """One key per frame of ``frames`` [N, ...]: its device, dtype and a digest of its bytes."""
    rows = frames.detach().cpu().contiguous().view(torch.uint8).reshape(frames.shape[0], -1).numpy()
    tag = (str(frames.device), str(frames.dtype))
    return [(*tag, hashlib.blake2b(row.tobytes(), digest_size=DIGEST_BYTES).digest()) for row in rows]


class CachingImageEncoder(ImageEncoder):
    """:class:`~sam2.modeling.backbones.image_encoder.ImageEncoder` with a per-frame feature cache (LRU,
    ``cache_frames`` frames; 0: off). Same parameters and state dict keys as the package's encoder."""

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0, cache_frames: int = 0) -> None:
        super().__init__(trunk, neck, scalp)
        if cache_frames < 0:
            raise ValueError(f"image encoder cache_frames must be >= 0, got {cache_frames}")
        self.cache_frames = cache_frames
        self.stochastic = any(
            isinstance(module, DropPath) or (isinstance(module, nn.Dropout) and module.p > 0)
            for module in self.modules()
        )
        self.features: OrderedDict[FrameKey, list[Tensor]] = OrderedDict()
        self.positions: dict[Placement, list[Tensor]] = {}
        self.hits = 0
        self.misses = 0
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.clear())

    def clear(self) -> None:
        """Forget every kept frame (the weights changed)."""
        self.features.clear()
        self.positions.clear()

    def cacheable(self, sample: Tensor) -> bool:
        """Whether the features of ``sample`` are a function of its pixels alone, with no gradient."""
        if self.cache_frames == 0 or sample.requires_grad or (self.training and self.stochastic):
            return False
        return not any(parameter.requires_grad for parameter in self.parameters())

    def forward(self, sample: Tensor) -> dict[str, Any]:
        if not self.cacheable(sample):
            self.clear()
            return super().forward(sample)
        keys = frame_keys(sample)
        missing = {key: index for index, key in enumerate(keys) if key not in self.features}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for key, index in missing.items():
            self.keep(key, super().forward(sample[index : index + 1]))
        for key in keys:
            self.features.move_to_end(key)
        levels = [torch.stack(level) for level in zip(*(self.features[key] for key in keys), strict=True)]
        positions = self.positions[keys[0][:2]]
        output = {
            "vision_features": levels[-1],
            "vision_pos_enc": [position.expand(len(keys), -1, -1, -1) for position in positions],
            "backbone_fpn": levels,
        }
        while len(self.features) > self.cache_frames:
            self.features.popitem(last=False)
        return output

    def keep(self, key: FrameKey, encoded: dict[str, Any]) -> None:
        """Keep the feature levels of one newly encoded frame; the position encodings, which depend on the
        maps' shapes alone, once per device and dtype."""
        self.features[key] = [level[0].clone() for level in encoded["backbone_fpn"]]
        self.positions[key[:2]] = [position.clone() for position in encoded["vision_pos_enc"]]
