"""Data loading speed, side by side in one run on the same clips: the shard loader against Sa2VA-style
loading from the MeViS layout, and against what the tiny model's stage-2 training consumes.

The benchmark writes its own MeViS-layout dataset into a temporary folder (720p JPEG frames,
``meta_expressions.json``, ``mask_dict.json`` with one COCO RLE per object and frame), converts it with
``desa2va shards build --format mevis [--max-size]`` and measures samples/s of

(a) the shard loader: the real DataModule with the packaged defaults (1 worker, batch 8, T = 5), on shards
    whose frames were resized at conversion (``--max-size``), and (a') on shards that keep the 720p frames
    (decoded at reduced scale, JPEG draft);
(b) Sa2VA-style loading: the JSON files loaded once, then per sample the T sampled 720p JPEGs opened from
    the folder and the expression's RLEs decoded for those frames, as the MeViS layout forces (Sa2VA's
    ``Sa2VA03RefVOS``); through the same clip encoder, collation and DataLoader settings as (a);
(c) the tiny DeSa2VA's stage-2 training steps (forward, backward, optimizer) at the same batch size.

The figures that matter are the ratios a / b and a / c, which hold across machines better than samples/s.

    .venv/bin/python benchmarks/data_loading.py [--videos 20] [--frames 30 80] [--max-size 256] [--rounds 5]

Rates are medians over interleaved rounds (a change in the machine's load weighs on all alike); the title
gives the load average, which on a shared machine says how far the absolute figures are from an idle one.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from lightning_desa2va.build import build_components, build_datamodule
from lightning_desa2va.config import compose_config
from lightning_desa2va.data.clips import ClipEncoder, collate_clips
from lightning_desa2va.data.converters.build import build_shards
from lightning_desa2va.data.converters.mevis import decode_rle
from lightning_desa2va.data.schema import Expression, ObjectTrack

HEIGHT, WIDTH = 720, 1280
OBJECTS_PER_VIDEO = 3
EXPRESSIONS_PER_VIDEO = 6
JPEG_QUALITY = 90
NOISE = 8.0
"""Pixel noise (std) on the smooth scene, so the JPEGs have a real video's size (~150-250 kB at 720p)."""
WARMUP_BATCHES = 2
CONVERSION_WORKERS = 2
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
OVERRIDES = ["experiment=desa2va_tiny", "stage=decoupled_finetune"]


def write_mevis_layout(root: Path, videos: int, frames: tuple[int, int], seed: int) -> None:
    """``root/train/{JPEGImages, meta_expressions.json, mask_dict.json}`` with moving ellipses."""
    rng = np.random.default_rng(seed)
    base = root / "train"
    meta: dict[str, Any] = {"videos": {}}
    mask_dict: dict[str, list] = {}
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    for v in range(videos):
        name = f"{v:04d}{rng.integers(1 << 32):08x}"
        count = int(rng.integers(frames[0], frames[1] + 1))
        phase = rng.uniform(0, 2 * np.pi, 3)
        scene = np.stack([127 + 80 * np.sin(xs / (90 + 30 * c) + ys / 140 + phase[c]) for c in range(3)], -1)
        noise = rng.normal(0, NOISE, (HEIGHT, WIDTH + count * 4, 3))
        starts = rng.uniform([100, 100], [WIDTH - 300, HEIGHT - 200], (OBJECTS_PER_VIDEO, 2))
        velocity = rng.uniform(-6, 6, (OBJECTS_PER_VIDEO, 2))
        radii = rng.uniform(40, 110, (OBJECTS_PER_VIDEO, 2))
        colours = rng.uniform(0, 255, (OBJECTS_PER_VIDEO, 3))
        annos = [f"{v * OBJECTS_PER_VIDEO + k}" for k in range(OBJECTS_PER_VIDEO)]
        for anno in annos:
            mask_dict[anno] = []
        frame_dir = base / "JPEGImages" / name
        frame_dir.mkdir(parents=True)
        for t in range(count):
            image = scene + noise[:, 4 * t : 4 * t + WIDTH]
            for k, anno in enumerate(annos):
                cx, cy = starts[k] + velocity[k] * t
                inside = ((xs - cx) / radii[k, 0]) ** 2 + ((ys - cy) / radii[k, 1]) ** 2 <= 1
                image[inside] = colours[k] + noise[:, :WIDTH][inside] / 2
                encoded = mask_utils.encode(np.asfortranarray(inside.astype(np.uint8)))
                mask_dict[anno].append({"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode("ascii")})
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(frame_dir / f"{t:05d}.jpg", quality=JPEG_QUALITY)
        expressions = {}
        for e in range(EXPRESSIONS_PER_VIDEO):
            objects = sorted(rng.choice(OBJECTS_PER_VIDEO, size=1 + e % 2, replace=False).tolist())
            text = f"the thing number {e} moving somewhere"
            expressions[str(e)] = {
                "exp": text,
                "obj_id": objects,
                "anno_id": [int(annos[o]) for o in objects],
            }
        meta["videos"][name] = {
            "vid_id": v,
            "frames": [f"{t:05d}" for t in range(count)],
            "expressions": expressions,
        }
    (base / "meta_expressions.json").write_text(json.dumps(meta))
    (base / "mask_dict.json").write_text(json.dumps(mask_dict))


class FolderClip:
    """One (video, expression) of the MeViS layout, read as Sa2VA reads it: each asked-for frame opened
    from its JPEG at full size, the expression's annotations decoded from their RLEs for that frame."""

    def __init__(
        self, folder: Path, video: str, frames: list[str], masks: dict[int, list], objects: list[int]
    ):
        self.video_id, self.folder, self.frames, self.masks = video, folder, frames, masks
        self.objects = [ObjectTrack(id=o) for o in objects]
        self.qa: list = []
        self.num_frames = len(frames)

    def frame(self, t: int, min_size: int = 0) -> np.ndarray:
        with Image.open(self.folder / f"{self.frames[t]}.jpg") as img:
            return np.asarray(img.convert("RGB"))

    def mask(self, t: int) -> np.ndarray:
        ids = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
        for object_id, rles in self.masks.items():
            ids[decode_rle(rles[t], (HEIGHT, WIDTH), self.video_id).astype(bool)] = object_id
        return ids


class Sa2VAStyleMeViS(Dataset):
    """Sa2VA's MeViS loading: ``meta_expressions.json`` and ``mask_dict.json`` loaded once; a sample is
    one expression, its frames and masks read from the folder and the RLEs when it is asked for."""

    def __init__(self, root: Path, encoder: ClipEncoder) -> None:
        base = root / "train"
        self.videos = json.loads((base / "meta_expressions.json").read_text())["videos"]
        self.mask_dict = json.loads((base / "mask_dict.json").read_text())
        self.frame_root = base / "JPEGImages"
        self.encoder = encoder
        self.items = [(video, key) for video, entry in self.videos.items() for key in entry["expressions"]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video, key = self.items[index]
        entry = self.videos[video]
        expression = entry["expressions"][key]
        ids = [o + 1 for o in expression["obj_id"]]
        masks = {o: self.mask_dict[str(a)] for o, a in zip(ids, expression["anno_id"], strict=True)}
        clip = FolderClip(self.frame_root / video, video, entry["frames"], masks, ids)
        return self.encoder(clip, Expression(expression["exp"], ids, "motion", ""))  # type: ignore[arg-type]


def loader_rate(make_loader: Callable[[], DataLoader], count: int) -> float:
    """Samples/s of a fresh loader over ``count`` batches, after ``WARMUP_BATCHES`` not timed (worker
    start, first reads); its workers are gone when it returns, so nothing else competes for the CPUs."""
    loader = make_loader()
    epochs = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch
    for _ in range(WARMUP_BATCHES):
        next(epochs)
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        samples += len(next(epochs)["expression"])
    rate = samples / (time.perf_counter() - start)
    epochs.close()
    del epochs, loader  # shuts the (persistent) workers down
    gc.collect()
    return rate


class TrainingSteps:
    """Stage-2 training steps (forward + backward + optimizer) of the tiny model on fixed batches."""

    def __init__(self, parts: Any, batches: list[dict[str, Any]]) -> None:
        self.parts, self.batches = parts, batches
        self.optimizer = parts.stage.configure_optimizers()
        for batch in batches[:WARMUP_BATCHES]:
            self.step(batch)

    def step(self, batch: dict[str, Any]) -> None:
        loss = self.parts.stage.compute_losses(batch)[1].total
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def samples_per_second(self, count: int) -> float:
        start, samples = time.perf_counter(), 0
        for index in range(count):
            batch = self.batches[index % len(self.batches)]
            self.step(batch)
            samples += len(batch["expression"])
        return samples / (time.perf_counter() - start)


def measure(args: argparse.Namespace, root: Path) -> tuple[dict[str, float], Any]:
    """Median samples/s of (a), (a'), (b) and (c) over ``args.rounds`` interleaved rounds (a change in the
    machine's load weighs on all alike), each measured with no other loader's workers alive."""
    cfg = compose_config([*OVERRIDES, f"paths.data_dir={root / 'resized'}"], EXPERIMENTS_DIR)
    parts = build_components(cfg)
    datamodule = parts.datamodule
    shard_modules = {
        name: build_datamodule(
            compose_config([*OVERRIDES, f"paths.data_dir={root / name}"], EXPERIMENTS_DIR),
            parts.tokenizer,
            parts.model,
        )
        for name in ("resized", "720p")
    }
    factories: dict[str, Callable[[], DataLoader]] = {
        name: module.train_dataloader for name, module in shard_modules.items()
    }
    sa2va = Sa2VAStyleMeViS(root / "mevis", datamodule.train_encoder)
    factories["sa2va"] = lambda: DataLoader(
        sa2va,
        batch_size=datamodule.batch_size,
        shuffle=True,
        num_workers=datamodule.num_workers,
        collate_fn=lambda samples: collate_clips(samples, parts.tokenizer.pad_token_id),
        persistent_workers=datamodule.num_workers > 0,
    )
    fixed = list(itertools.islice(datamodule.train_dataloader(), WARMUP_BATCHES + args.steps))
    gc.collect()
    training = TrainingSteps(parts, fixed)
    rates: dict[str, list[float]] = {name: [] for name in (*factories, "training")}
    for _ in range(args.rounds):
        for name, factory in factories.items():
            rates[name].append(loader_rate(factory, max(1, args.batches // args.rounds)))
        rates["training"].append(training.samples_per_second(max(1, args.steps // args.rounds)))
    return {name: float(np.median(values)) for name, values in rates.items()}, datamodule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--frames", type=int, nargs=2, default=(30, 80), help="frames per video, min max")
    parser.add_argument("--max-size", type=int, default=256, help="frames' longer side in the shards of (a)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches of (a), (a') and (b)")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps of (c)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="desa2va-data-bench-") as tmp:
        root = Path(tmp)
        write_mevis_layout(root / "mevis", args.videos, tuple(args.frames), args.seed)
        for name, max_size in (("resized", args.max_size), ("720p", None)):
            build_shards("mevis", root / "mevis", "train", root / name, CONVERSION_WORKERS, max_size)
        rates, datamodule = measure(args, root)
    rows = {
        f"(a) shard loader, frames resized at conversion (--max-size {args.max_size})": rates["resized"],
        "(a') shard loader, 720p frames in the shards (JPEG draft decoding)": rates["720p"],
        "(b) Sa2VA-style: 720p JPEG folder + mask_dict.json RLEs per sample": rates["sa2va"],
        "(c) tiny DeSa2VA stage-2 training consumption": rates["training"],
    }
    title = (
        f"samples/s, {args.videos} MeViS-layout videos of {args.frames[0]}-{args.frames[1]} 720p frames, "
        f"batch {datamodule.batch_size}, T={datamodule.train_encoder.num_frames}, "
        f"{datamodule.num_workers} loader worker(s), {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    table = Table(title=title)
    for column in ("what", "samples / s"):
        table.add_column(column)
    for name, rate in rows.items():
        table.add_row(name, f"{rate:.1f}")
    for name, ratio in (
        ("a / b (target >= 3)", rates["resized"] / rates["sa2va"]),
        ("a / c (target >= 5)", rates["resized"] / rates["training"]),
        ("a' / b", rates["720p"] / rates["sa2va"]),
        ("a' / c", rates["720p"] / rates["training"]),
    ):
        table.add_row(name, f"{ratio:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
