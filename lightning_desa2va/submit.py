"""``desa2va submit``: a stage-2 model over a whole converted split, as benchmark servers take it.

Every expression of every video is inferred under the configured protocol (as ``desa2va predict``) and its
masks are written at the video's own size in the servers' layout, ``<out>/Annotations/<video>/<expression
id>/<frame>.png`` (:mod:`~lightning_desa2va.data.layout`). A split published without masks (MeViS ``valid``,
Ref-YouTube-VOS ``valid``) is then zipped into ``<out>/submission.zip`` for the server; a split with ground
truth (MeViS ``valid_u``, Ref-DAVIS17, ReVOS) is scored offline instead, J, F and J&F from the written masks
against each expression's ground truth, as Sa2VA's evaluation tools do. An expression whose masks are all
written is not inferred again, so an interrupted run resumes where it stopped. ``<out>/submission.json``
records the checkpoint, the data, the split, the protocol and (with ground truth) the scores.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lightning_desa2va.data.layout import expression_masks, split_expressions, videos_of
from lightning_desa2va.data.schema import Expression, VideoSample
from lightning_desa2va.data.shards import read_manifest
from lightning_desa2va.metrics import JFMetric
from lightning_desa2va.predict import load_predictor

log = logging.getLogger(__name__)

ANNOTATIONS_DIR = "Annotations"
ZIP_NAME = "submission.zip"
RECORD_NAME = "submission.json"


@dataclass
class Submission:
    """What a submit run did: where, on what, under which protocol, and the scores where it could score."""

    checkpoint: str
    data_dir: str
    split: str
    eval: str
    eval_config: dict
    overrides: list[str]
    expressions: int = 0
    inferred: int = 0
    """Expressions inferred by this run (the others were written by an earlier one)."""
    zip_file: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    finished: str = ""


def has_ground_truth(data_dir: Path, split: str) -> bool:
    """Whether a converted split has masks (its manifest entry says; older manifests: it has)."""
    return bool(read_manifest(data_dir).get("splits", {}).get(split, {}).get("ground_truth", True))


def submit(cfg: DictConfig, checkpoint: Path, data_dir: Path, split: str, out: Path) -> Submission:
    """Infer every expression of ``split`` into ``out`` in the servers' layout, then zip it (no ground
    truth) or score it (ground truth)."""
    truth = has_ground_truth(data_dir, split)
    annotations = out / ANNOTATIONS_DIR
    record = Submission(
        checkpoint=str(checkpoint),
        data_dir=str(data_dir),
        split=split,
        eval=str(cfg.run.choices.get("eval")),
        eval_config=OmegaConf.to_container(cfg.eval, resolve=True),
        overrides=list(cfg.run.overrides),
    )
    predictor = None
    jf = JFMetric()
    total = split_expressions(data_dir, split)
    with tqdm(total=total, desc=f"{split} expressions", unit="expression") as bar:
        for video in videos_of(data_dir, split):
            for index, expression in enumerate(video.expressions):
                masks = expression_masks(annotations, video, index)
                frames = range(video.num_frames)
                if not masks.done():
                    predictor = predictor or load_predictor(cfg, checkpoint)
                    masks.write(predictor.masks(np.stack([video.frame(t) for t in frames]), expression.text))
                    record.inferred += 1
                if truth:
                    score(jf, masks.read(), video, expression)
                record.expressions += 1
                bar.update()
    if truth:
        record.scores = jf.compute()
    else:
        record.zip_file = str(zip_annotations(annotations, out / ZIP_NAME))
    record.finished = datetime.now().isoformat(timespec="seconds")
    (out / RECORD_NAME).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record


def score(metric: JFMetric, predicted: np.ndarray, video: VideoSample, expression: Expression) -> None:
    """Add one expression's written masks [T, H, W], against its ground truth at the video's size."""
    frames = range(video.num_frames)
    target = np.stack([video.target_mask(t, expression.object_ids, original=True) for t in frames])
    metric.update(torch.from_numpy(predicted)[None], torch.from_numpy(target)[None], [expression.type])


def zip_annotations(annotations: Path, path: Path) -> Path:
    """``annotations`` zipped with its own folder name at the root, PNGs in sorted order."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for png in sorted(annotations.rglob("*.png")):
            archive.write(png, png.relative_to(annotations.parent).as_posix())
    log.info("zipped %s into %s", annotations, path)
    return path
