"""SAM-2's image encoder, keeping each frame's features while its weights are frozen.

Why: every stage but SAM-2's own pre-training freezes the image encoder, yet on the tiny default it is about
40% of a stage-1 step and a third of a stage-2 step, and a study meets each frame many times (the demo's
400 training videos hold 3,200 frames; its 2,000 steps encode ~44,000, and stage 2 meets the frames stage 1
met). With ``cache_frames`` = N > 0 the encoder keeps the features of the N frames used last and encodes
only frames it has not kept, one at a time:

    features(x) = kept[key(E, x)] if key(E, x) in kept else E(x)

where key(E, x) digests the encoder E (its modules' settings and its weights) and the frame's bytes (with
its shape, device, dtype and torch's thread count, which fixes a CPU result's last bits). What is kept
belongs to the process, not to one encoder: the next stage, each validation and the next run of a sweep,
built with the same frozen weights, meet the features already kept; an encoder whose weights differ in one
bit keys apart. One frame at a time because the encoder's results differ in the last bits with the batch
size: a frame's features must not depend on which frames it was first met with, or a resumed run (which
may find nothing kept) would not repeat the uninterrupted one. Nothing is served while any encoder weight
trains or the input needs a gradient, nor in training mode when the encoder is stochastic (drop path,
dropout). A frame's features cost 4 bytes × d_model × the cells of the kept levels (tiny default: 344 KB;
Hiera-L at 1024 px: ~88 MB, so the real-weight configs leave it off).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from typing import Any

import torch
from sam2.modeling.backbones.image_encoder import ImageEncoder
from sam2.modeling.sam2_utils import DropPath
from torch import Tensor, nn

Placement = tuple[bytes, str, str, int, str]
"""The encoder's digest; the frames' device, dtype, thread count of torch and shape."""
FrameKey = tuple[bytes, str, str, int, str, bytes]
"""A frame's placement and the digest of its bytes."""
WeightsStamp = tuple[tuple[int, int, torch.dtype, torch.device], ...]
"""Where each weight lives and how often it was changed in place: the encoder's digest is recomputed when
this changes (a load, ``.to()``, an in-place edit)."""
SETTING_TYPES = (int, float, bool, str, tuple, list, type(None))
"""Attribute types that hold a module's settings (window sizes, strides, heads, ...)."""

KEPT: OrderedDict[FrameKey, list[Tensor]] = OrderedDict()
"""The features of the frames used last, by key, shared by every caching encoder of the process."""
POSITIONS: dict[Placement, list[Tensor]] = {}
"""Position encodings, which depend on the encoder and the maps' shapes alone, once per placement."""


def frame_digests(frames: Tensor) -> list[bytes]:
    """One digest of the bytes of each frame of ``frames`` [N, ...] (SHA-256: the CPU's own instructions
    make it twice as fast as BLAKE2 here, and the frames are hashed every step)."""
    rows = frames.detach().cpu().contiguous().view(torch.uint8).reshape(frames.shape[0], -1).numpy()
    return [hashlib.sha256(row).digest() for row in rows]


def module_settings(module: nn.Module) -> str:
    """Each submodule's class and plain settings: what, besides the weights, fixes a module's output."""
    return repr(
        [
            (name, type(part).__qualname__, sorted(settings(part).items()))
            for name, part in module.named_modules()
        ]
    )


def settings(module: nn.Module) -> dict[str, Any]:
    """The public attributes of ``module`` that hold settings, not state (``training`` is a mode)."""
    return {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_") and key != "training" and isinstance(value, SETTING_TYPES)
    }


class CachingImageEncoder(ImageEncoder):
    """:class:`~sam2.modeling.backbones.image_encoder.ImageEncoder` serving frames from the process's
    :data:`KEPT` features (LRU, at most ``cache_frames`` frames; 0: off). Same parameters and state dict keys
    as the package's encoder; ``hits`` and ``misses`` count this encoder's frames."""

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0, cache_frames: int = 0) -> None:
        super().__init__(trunk, neck, scalp)
        if cache_frames < 0:
            raise ValueError(f"image encoder cache_frames must be >= 0, got {cache_frames}")
        self.cache_frames = cache_frames
        self.stochastic = any(
            isinstance(module, DropPath) or (isinstance(module, nn.Dropout) and module.p > 0)
            for module in self.modules()
        )
        self.hits = 0
        self.misses = 0
        self.digest_of: tuple[WeightsStamp, bytes] | None = None

    def cacheable(self, sample: Tensor) -> bool:
        """Whether the features of ``sample`` are a function of its pixels alone, with no gradient."""
        if self.cache_frames == 0 or sample.requires_grad or (self.training and self.stochastic):
            return False
        return not any(parameter.requires_grad for parameter in self.parameters())

    def digest(self) -> bytes:
        """A digest of the encoder's settings and weights, recomputed only when a weight has changed."""
        weights = list(itertools.chain(self.parameters(), self.buffers()))
        stamp = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        if self.digest_of is None or self.digest_of[0] != stamp:
            digest = hashlib.sha256()
            digest.update(f"{module_settings(self.trunk)}{module_settings(self.neck)}{self.scalp}".encode())
            for name, tensor in self.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            self.digest_of = (stamp, digest.digest())
        return self.digest_of[1]

    def forward(self, sample: Tensor) -> dict[str, Any]:
        if not self.cacheable(sample):
            return super().forward(sample)
        frame = (str(sample.device), str(sample.dtype), torch.get_num_threads(), str(tuple(sample.shape[1:])))
        placement = (self.digest(), *frame)
        keys = [(*placement, digest) for digest in frame_digests(sample)]
        missing = {key: index for index, key in enumerate(keys) if key not in KEPT}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for key, index in missing.items():
            self.keep(key, super().forward(sample[index : index + 1]))
        for key in keys:
            KEPT.move_to_end(key)
        levels = [torch.stack(level) for level in zip(*(KEPT[key] for key in keys), strict=True)]
        output = {
            "vision_features": levels[-1],
            "vision_pos_enc": [position.expand(len(keys), -1, -1, -1) for position in POSITIONS[placement]],
            "backbone_fpn": levels,
        }
        while len(KEPT) > self.cache_frames:
            KEPT.popitem(last=False)
        return output

    def keep(self, key: FrameKey, encoded: dict[str, Any]) -> None:
        """Keep the feature levels of one newly encoded frame, and its placement's position encodings."""
        KEPT[key] = [level[0].clone() for level in encoded["backbone_fpn"]]
        POSITIONS[key[:-1]] = [position.clone() for position in encoded["vision_pos_enc"]]
