"""``desa2va submit``: a split without ground truth becomes the zip MeViS's and Ref-YouTube-VOS's servers take
(``Annotations/<video>/<expression id>/<frame>.png``, the source's ids and frame names, masks at the video's
size), resumably; a split with ground truth is scored offline instead."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from source_layouts import HEIGHT, WIDTH, write_mevis, write_refytvos

from lightning_desa2va.cli import main
from lightning_desa2va.data.converters.build import build_shards

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
STAGE_2 = ["stage=decoupled_finetune", "stage.num_overlays=0"]


@pytest.fixture(scope="module")
def checkpoint(make_model, make_batch, build_stage, fit_on_batch, tmp_path_factory) -> Path:
    """A stage-2 checkpoint of the tiny default, one step trained."""
    cfg, model = make_model(*STAGE_2)
    stage = build_stage(cfg, model)
    root = tmp_path_factory.mktemp("stage2")
    trainer, _ = fit_on_batch(stage, make_batch(model, ["the red circle"]), 1, root)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


def submit(checkpoint: Path, data: Path, split: str, out: Path) -> None:
    main(
        [
            "submit",
            "--ckpt",
            str(checkpoint),
            "--data",
            str(data),
            "--split",
            split,
            "--out",
            str(out),
            *STAGE_2,
        ]
    )


def server_layout(meta: dict) -> set[str]:
    """Every PNG a server expects for the videos of a ``meta_expressions.json``."""
    return {
        f"Annotations/{video}/{exp_id}/{frame}.png"
        for video, entry in meta["videos"].items()
        for exp_id in entry["expressions"]
        for frame in entry["frames"]
    }


@pytest.mark.parametrize("fmt", ["mevis", "refytvos"])
def test_a_split_without_ground_truth_becomes_the_servers_zip_and_resumes(
    fmt: str, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    root, data, out = tmp_path / "raw", tmp_path / "shards", tmp_path / "submission"
    if fmt == "mevis":
        write_mevis(root, "valid", ground_truth=False)
        meta_path = root / "valid" / "meta_expressions.json"
    else:
        write_refytvos(root, "valid", ground_truth=False)
        meta_path = root / "meta_expressions" / "valid" / "meta_expressions.json"
    build_shards(fmt, root, "valid", data)
    submit(checkpoint, data, "valid", out)
    assert "submission.zip" in capsys.readouterr().out
    with zipfile.ZipFile(out / "submission.zip") as archive:
        names = set(archive.namelist())
        assert names == server_layout(json.loads(meta_path.read_text()))
        for name in sorted(names)[:3]:
            with archive.open(name) as member:
                mask = Image.open(member)
                assert mask.mode == "L" and mask.size == (WIDTH, HEIGHT)
                assert set(np.unique(np.asarray(mask))) <= {0, 255}
    record = json.loads((out / "submission.json").read_text())
    assert (record["split"], record["eval"], record["inferred"]) == (
        "valid",
        "sa2va",
        len(names) and record["expressions"],
    )
    pngs = {path: path.stat().st_mtime_ns for path in out.rglob("*.png")}
    submit(checkpoint, data, "valid", out)  # resumed: every expression is written, nothing is inferred again
    assert json.loads((out / "submission.json").read_text())["inferred"] == 0
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.png")} == pngs


def test_a_split_with_ground_truth_is_scored_offline(checkpoint: Path, tmp_path: Path, capsys) -> None:
    root, data, out = tmp_path / "raw", tmp_path / "shards", tmp_path / "scored"
    write_mevis(root, "valid_u")
    build_shards("mevis", root, "valid_u", data, out_split="val")
    submit(checkpoint, data, "val", out)
    printed = capsys.readouterr().out
    record = json.loads((out / "submission.json").read_text())
    assert record["zip_file"] is None and not (out / "submission.zip").exists()
    assert 0.0 <= record["scores"]["JF"] <= 1.0 and record["expressions"] == 4
    assert "J&F" in printed
