"""Peak memory of a stage-2 training step and of inference, for the tiny default and a real-shaped model.

    .venv/bin/python benchmarks/memory.py --small     # the tiny default and the small shape, end to end
    .venv/bin/python benchmarks/memory.py             # the tiny default and the desa2va_1b shape

The real-shaped models run stage 2 as ``experiment=desa2va_1b`` configures it (LoRA r=128 on every LLM linear
layer, [SEG] rows, gradient checkpointing, 12,544 mask-loss points, Sa2VA-i inference, SAM-2 in 8-frame
chunks) from random weights in the real formats (benchmarks/real_shapes.py). Printed per model: each part's
parameters, frozen and trained, and the bytes they hold in training (frozen ones in the run's precision,
bf16 on a GPU; trained ones in fp32 with gradient and AdamW's two moments, 16 bytes each); then peak memory
(CUDA max allocated on a GPU, the process's resident set on a CPU) of one training step of
``data.batch_size`` clips and of inferring one video.

On a GPU the desa2va_1b shape runs end to end in bf16. On a CPU a step of it takes the better part of an hour,
so each part runs alone in bf16 (SAM-2-L's image encoder on one 1,024-px frame, the vision tower on one
frame, the VLM forward and backward on one 5-frame clip), each after an unmeasured first run, and the GPU
sizes that fit are estimated from those figures (``estimate``); the README's "Memory and GPUs" table is that
estimate. A CPU's allocator and kernels are not CUDA's: the figures bound the GPU's rather than equal them.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric import Fabric
from real_shapes import GIB, MIB, REAL_1B, SMALL, PeakMemory, Shape, device_overrides, write_weights
from rich.console import Console
from rich.table import Table

from lightning_desa2va.build import Components, build_components
from lightning_desa2va.config import compose_config
from lightning_desa2va.console import quiet_third_party_output
from lightning_desa2va.data.clips import collate_clips
from lightning_desa2va.data.synthetic import SyntheticConfig, render_video
from lightning_desa2va.predict import Predictor

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
STAGE_2 = ["stage=decoupled_finetune", "stage.num_overlays=0"]
TINY = ["experiment=desa2va_tiny"]
TRAINED_BYTES = 16
"""Bytes a trained parameter holds in training: fp32 weight, gradient and AdamW's two moments."""
GPU_SIZES_GIB = (24, 40, 80)
VIDEO = {"tiny": (8, (128, 128)), "small": (32, (180, 320)), "1b": (80, (720, 1280))}
"""Frames and size of the video inferred per model (MeViS: ~80 frames at 720p)."""
PARTS = {
    "VLM vision tower + projector": ("vlm.model.model.vision_tower", "vlm.model.model.multi_modal_projector"),
    "LLM (embeddings, layers, head)": ("vlm.model.model.language_model", "vlm.model.lm_head"),
    "SAM-2 image encoder": ("sam.image_encoder",),
    "SAM-2 mask decoder": ("sam.sam_mask_decoder",),
    "SAM-2 memory, prompt encoder, rest": ("sam.",),
}
OTHER = "DeSa2VA modules"


@dataclass
class Part:
    """One part of a model: parameters frozen and trained, and the bytes they hold in training."""

    name: str
    frozen: int = 0
    trained: int = 0
    frozen_bytes: int = 0

    @property
    def training_bytes(self) -> int:
        return self.frozen_bytes + TRAINED_BYTES * self.trained


def parts_of(components: Components) -> list[Part]:
    """The model's parameters by part (:data:`PARTS`, the rest are the DeSa2VA modules)."""
    rows: dict[str, Part] = {}
    for name, parameter in components.model.named_parameters():
        label = next((part for part, prefixes in PARTS.items() if name.startswith(prefixes)), OTHER)
        row = rows.setdefault(label, Part(label))
        if parameter.requires_grad:
            row.trained += parameter.numel()
        else:
            row.frozen += parameter.numel()
            row.frozen_bytes += parameter.numel() * parameter.element_size()
    return list(rows.values())


def build(overrides: list[str], device: str) -> tuple[Components, Fabric]:
    cfg = compose_config(
        [*STAGE_2, *overrides, *device_overrides(device, overrides != TINY)], EXPERIMENTS_DIR
    )
    components = build_components(cfg)
    components.stage.to(device)
    precision = cfg.trainer.get("precision", "32-true")
    return components, Fabric(
        accelerator="cuda" if device == "cuda" else "cpu", devices=1, precision=precision
    )


def clip_batch(components: Components, num_clips: int) -> dict:
    """``num_clips`` synthetic clips at SAM-2's size through the training encoder (``data.num_frames``)."""
    size = components.model.sam.image_size
    config = SyntheticConfig(image_size=size, num_frames=components.datamodule.train_encoder.num_frames)
    videos = [render_video(config, seed, f"clip-{seed}") for seed in range(num_clips)]
    samples = [components.datamodule.train_encoder(v.sample, v.sample.expressions[0]) for v in videos]
    return collate_clips(samples, components.tokenizer.pad_token_id)


def measure(device: str, work: Callable[[], object], warm_up: bool = False) -> PeakMemory:
    """The peak of ``work``; after an unmeasured first run with ``warm_up`` (a CPU's bf16 kernels keep a
    reordered copy of the weights they use, once: a GPU has nothing like it)."""
    if warm_up:
        work()
    with PeakMemory(device) as meter:
        work()
    return meter


def end_to_end(name: str, overrides: list[str], device: str) -> tuple[list[Part], dict[str, PeakMemory]]:
    """One training step of a batch and one inference of :data:`VIDEO`'s video, each under the meter."""
    components, fabric = build(overrides, device)
    stage = components.stage
    batch = fabric.to_device(clip_batch(components, components.datamodule.batch_size))
    optimizer = stage.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    stage.train()

    def step() -> None:
        with fabric.autocast():
            _, losses = stage.compute_losses(batch)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    frames, size = VIDEO[name]
    video = torch.randint(0, 255, (frames, *size, 3), dtype=torch.uint8).numpy()
    predictor = Predictor(
        stage.eval(), components.datamodule.eval_encoder, fabric, stage.inference.chunk_frames
    )
    peaks = {
        f"training step ({len(batch['expression'])} clips x {batch['frames'].shape[1]} frames)": measure(
            device, step
        ),
        f"inference, {frames} frames at {size[0]}x{size[1]}": measure(
            device, lambda: predictor.masks(video, "it")
        ),
    }
    return parts_of(components), peaks


def part_by_part(overrides: list[str]) -> tuple[list[Part], dict[str, PeakMemory], dict[str, int]]:
    """The desa2va_1b shape on a CPU, built as on a GPU (frozen weights in bf16) and run in bf16 a part at a
    time: SAM-2's image encoder on one frame, the vision tower on one frame, the VLM forward and backward on
    one clip. The meters, and the bytes of SAM-2's features a tracked frame keeps."""
    cfg = compose_config([*STAGE_2, *overrides], EXPERIMENTS_DIR)
    components = build_components(cfg)
    model = components.model
    batch = clip_batch(components, 1)
    sam_size, vlm_size = model.sam.image_size, model.vlm.image_size
    kept: dict[str, int] = {}

    def encode_frame() -> None:
        feats, pos, _ = model.sam._encode(torch.randn(1, 3, sam_size, sam_size))
        kept["features a frame"] = sum(t.numel() * t.element_size() for t in [*feats, *pos])

    def vision_frame() -> None:
        model.vlm.model.model.get_image_features(pixel_values=torch.randn(1, 3, vlm_size, vlm_size))

    def vlm_clip() -> None:
        model.vlm.zero_grad(set_to_none=True)
        out = model.vlm(
            batch["input_ids"], batch["attention_mask"], batch["vlm_pixels"].flatten(0, 1), batch["labels"]
        )
        (out.lm_loss + out.seg_hidden.float().square().mean()).backward()

    peaks = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            peaks[f"SAM-2 image encoder, 1 frame at {sam_size} px"] = measure("cpu", encode_frame, True)
            peaks[f"VLM vision tower, 1 frame at {vlm_size} px"] = measure("cpu", vision_frame, True)
        model.train()
        tokens = batch["input_ids"].shape[1]
        peaks[f"VLM forward + backward, 1 clip ({tokens} tokens)"] = measure("cpu", vlm_clip, True)
    # what else a tracked frame holds: its fp32 inputs for SAM-2 and the VLM and its mask logits
    kept["inputs and logits a frame"] = 4 * (3 * sam_size**2 + 3 * vlm_size**2 + sam_size**2)
    return parts_of(components), peaks, kept


def estimate(parts: list[Part], peaks: dict[str, PeakMemory], kept: dict[str, int], cfg_batch: int) -> Table:
    """What fits a GPU, from the part-by-part figures: training holds the weights as trained (16 bytes a
    trained parameter), the VLM's activations for each clip and SAM-2's for a chunk of frames; inference holds
    the weights, one chunk's activations and the features of every tracked frame."""
    sam, vision, vlm = (meter.added for meter in peaks.values())
    frames = 5 * cfg_batch
    chunk = 8
    per_frame = sum(kept.values())
    weights_train = sum(part.training_bytes for part in parts)
    weights_infer = sum(part.frozen_bytes + 4 * part.trained for part in parts)
    train = weights_train + cfg_batch * vlm + min(chunk, frames) * sam + frames * per_frame + GIB
    transient = max(chunk * sam, 5 * vision)
    table = Table(title="estimate from the part-by-part figures (+1 GiB for the CUDA context)")
    for header in (
        "GPU",
        f"training step ({cfg_batch} clips x 5 frames)",
        "inference: longest video (frames at 1024 px)",
    ):
        table.add_column(header, justify="right")
    for size in GPU_SIZES_GIB:
        room = size * GIB - weights_infer - transient - GIB
        fits = "fits" if train <= size * GIB else "does not fit"
        table.add_row(f"{size} GB", f"{fits} ({train / GIB:.1f} GiB)", f"{max(0, room // per_frame):,}")
    return table


def parts_table(title: str, parts: list[Part]) -> Table:
    table = Table(title=title)
    for header in ("part", "frozen", "trained", "held in training"):
        table.add_column(header, justify="left" if header == "part" else "right")
    for part in parts:
        table.add_row(
            part.name, f"{part.frozen:,}", f"{part.trained:,}", f"{part.training_bytes / MIB:,.0f} MiB"
        )
    total = sum(part.training_bytes for part in parts)
    table.add_row(
        "total",
        f"{sum(p.frozen for p in parts):,}",
        f"{sum(p.trained for p in parts):,}",
        f"{total / MIB:,.0f} MiB",
    )
    return table


def peaks_table(title: str, peaks: dict[str, PeakMemory], device: str) -> Table:
    what = "CUDA max allocated" if device == "cuda" else "resident set"
    table = Table(title=f"{title}: peak memory ({what})")
    for header in ("measured", "peak", "added by it"):
        table.add_column(header, justify="left" if header == "measured" else "right")
    for name, meter in peaks.items():
        table.add_row(name, f"{meter.peak / MIB:,.0f} MiB", f"{meter.added / MIB:,.0f} MiB")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="the small shape, end to end (CPU-sized)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_output()
    console = Console()
    console.print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'})"
    )
    parts, peaks = end_to_end("tiny", TINY, args.device)
    console.print(parts_table("tiny default", parts), peaks_table("tiny default", peaks, args.device))
    shape: Shape = SMALL if args.small else REAL_1B
    with tempfile.TemporaryDirectory() as weights_dir:
        overrides = write_weights(shape, Path(weights_dir))  # the recipe's stage-2 LoRA comes with it
        if args.small or args.device == "cuda":
            parts, peaks = end_to_end("small" if args.small else "1b", overrides, args.device)
            console.print(parts_table(shape.name, parts), peaks_table(shape.name, peaks, args.device))
            return
        parts, peaks, kept = part_by_part(overrides)
    console.print(
        parts_table(shape.name, parts), peaks_table(f"{shape.name}, part by part in bf16", peaks, "cpu")
    )
    console.print(", ".join(f"{name} {size / MIB:.0f} MiB" for name, size in kept.items()))
    console.print(estimate(parts, peaks, kept, 2))


if __name__ == "__main__":
    main()
