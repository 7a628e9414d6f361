"""What the memory and GPU benchmarks share: real-shaped models with random weights in the real formats, the
overrides that run ``experiment=desa2va_1b`` on them, and a peak-memory meter.

Shapes. ``1b`` is InternVL3-1B-hf as its published ``config.json`` sets it: InternViT-300M (1,024 wide,
24 layers, 16 heads, MLP 4,096, 448 px in 14-px patches, layer scale 0.1, mean pooling) and Qwen2.5-0.5B
(896 wide, 24 layers, 14 heads, 2 key-value heads, MLP 4,864, a 151,674-word vocabulary tied to the head,
rope theta 1e6), pixel shuffle 0.5 (256 tokens a frame); with SAM-2.1 Hiera-L from the ``sam2`` package's
own config (1,024 px). ``small`` is the same classes at a size a 2-core CPU runs in minutes (ViT 256 wide,
4 layers, 112 px; LLM 256 wide, 4 layers; SAM-2.1 Hiera-T at 256 px). The folders are written by
tests/real_weight_folders.py (a ``save_pretrained`` InternVL ``-hf`` folder with processor, word-level
tokenizer and ChatML template; an official-format SAM-2 ``.pt``), as the tests write their tiny ones.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_weight_folders import VLM_FOLDER, write_internvl_hf, write_sam2_pt  # noqa: E402

MIB = 2**20
GIB = 2**30
SAMPLE_SECONDS = 0.005


@dataclass(frozen=True)
class Shape:
    """A model shape: the VLM's vision and language configs, its image size, and SAM-2's config."""

    name: str
    vision: dict
    text: dict
    image_size: int
    patch_size: int
    sam2_config: str
    sam2_overrides: list[str] = field(default_factory=list)

    @property
    def sam2_image_size(self) -> int:
        sizes = [int(o.partition("=")[2]) for o in self.sam2_overrides if o.startswith("model.image_size=")]
        return sizes[0] if sizes else 1024


REAL_1B = Shape(
    name="InternVL3-1B-hf shape + SAM-2.1 Hiera-L",
    vision={
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
    },
    text={
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151674,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    image_size=448,
    patch_size=14,
    sam2_config="configs/sam2.1/sam2.1_hiera_l.yaml",
)
SMALL = Shape(
    name="small (same classes, CPU-sized) + SAM-2.1 Hiera-T at 256 px",
    vision={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    text={
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
    },
    image_size=112,
    patch_size=14,
    sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml",
    sam2_overrides=[
        "model.image_size=256",
        "model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
        "model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    ],
)
SHAPES = {"1b": REAL_1B, "small": SMALL}


def write_weights(shape: Shape, weights_dir: Path) -> list[str]:
    """The shape's random weights under ``weights_dir`` (VLM in bf16, SAM-2 as SAM-2 ships), and the
    overrides that point ``experiment=desa2va_1b`` at them."""
    folder = write_internvl_hf(
        weights_dir / VLM_FOLDER,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        vision=shape.vision,
        text=shape.text,
        dtype=torch.bfloat16,
    )
    checkpoint = write_sam2_pt(weights_dir / "sam2.pt", shape.sam2_config, shape.sam2_overrides)
    quoted = ",".join(f"'{override}'" for override in shape.sam2_overrides)
    return [
        "experiment=desa2va_1b",
        f"paths.weights_dir={weights_dir}",
        f"model.folder={folder}",
        f"model.sam2.config_name={shape.sam2_config}",
        f"model.sam2.checkpoint={checkpoint}",
        f"model.sam2.overrides=[{quoted}]",
    ]


def device_overrides(device: str, real: bool) -> list[str]:
    """The trainer a run takes on ``device``: the recipe's own on a GPU (bf16-mixed), the CPU's in fp32 (a
    ``real`` model's folder then loads in fp32 too)."""
    if device == "cuda":
        return ["trainer=gpu"]
    return ["trainer=cpu", *(["model.vlm.dtype=float32"] if real else [])]


class PeakMemory:
    """Peak memory of a block: CUDA's max allocated on a GPU, else the process's resident set (sampled every
    few milliseconds on a thread); ``peak`` absolute and ``added`` above the block's start, in bytes."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = self.added = 0
        self._running = False

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            gc.collect()
            if sys.platform == "linux":  # hand freed heap pages back, so the block starts from what is live
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            process = psutil.Process()
            self.start = self.peak = process.memory_info().rss
            self._running = True
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        while self._running:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(SAMPLE_SECONDS)

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
        self.added = self.peak - self.start
