"""``desa2va``: the console entry point; subcommands take Hydra overrides (``fusion=dynamic``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.errors import HydraException, InstantiationException

from lightning_desa2va.config import ConfigError, compose_config
from lightning_desa2va.data.converters import DEFAULT_VIDEOS_PER_SHARD, FORMATS
from lightning_desa2va.data.schema import ShardFormatError
from lightning_desa2va.report import print_counts, print_metrics, print_summary

if TYPE_CHECKING:
    from lightning_desa2va.pipeline import StageRun

DEMO_EXPERIMENT = "experiment=desa2va_tiny"
LIGHTNING_LOGGER = "lightning"
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it; bad input ends with its message alone, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning prints its own messages through its own handler; propagating them too would print twice.
    logging.getLogger(LIGHTNING_LOGGER).propagate = False
    try:
        args.run(args)
    except (HydraException, ConfigError, ShardFormatError, FileNotFoundError) as error:
        # Hydra wraps what a component raised while being built; its cause names the bad input.
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        parser.exit(2, f"desa2va: error: {cause}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desa2va", description=__doc__)
    parser.add_argument("--experiments-dir", type=Path, default=None, help="folder of experiment YAMLs")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one stage (stage=text_pretrain|decoupled_finetune)")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. decoupler=linear fusion=dynamic")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="score a checkpoint on val or test beside the union baseline")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--split", choices=("val", "test"), default="val")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.set_defaults(run=_evaluate)

    demo = commands.add_parser("demo", help="the main job: shards, stage 1, stage 2, evaluation, summary")
    demo.add_argument("overrides", nargs="*", help=f"Hydra overrides (after {DEMO_EXPERIMENT})")
    demo.set_defaults(run=_demo)

    pretrain = commands.add_parser(
        "pretrain-tiny", help="train the tiny SAM-2 and VLM foundations from scratch and export them"
    )
    pretrain.add_argument("--out", type=Path, default=Path("outputs/foundations/tiny"))
    pretrain.add_argument("overrides", nargs="*")
    pretrain.set_defaults(run=_pretrain_tiny)

    shards = commands.add_parser("shards", help="write WebDataset shards")
    sources = shards.add_subparsers(required=True, metavar="SOURCE")
    synthetic = sources.add_parser("synthetic", help="the synthetic moving-shapes benchmark")
    synthetic.add_argument("--out", type=Path, required=True)
    synthetic.add_argument("--videos", type=int, required=True, help="videos in all, split 80/10/10")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--videos-per-shard", type=int, default=100)
    synthetic.set_defaults(run=_shards_synthetic)

    build = sources.add_parser("build", help="convert a dataset from the layout it ships in (docs/data.md)")
    build.add_argument("--format", required=True, choices=FORMATS)
    build.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    build.add_argument("--split", required=True, help="e.g. train, valid_u; RefCOCO: train, val, testA ...")
    build.add_argument(
        "--out", type=Path, required=True, help="shard folder ({split}-%%06d.tar, manifest.json)"
    )
    build.add_argument("--workers", type=_positive, default=1, help="processes converting videos")
    build.add_argument(
        "--max-size", type=_positive, default=None, help="scale frames to this longer side at most"
    )
    build.add_argument("--videos-per-shard", type=_positive, default=DEFAULT_VIDEOS_PER_SHARD)
    build.add_argument("--refs", default=None, help="RefCOCO: the refs file when the root has several")
    build.add_argument("--images", type=Path, default=None, help="RefCOCO: the COCO train2014 image folder")
    build.set_defaults(run=_shards_build)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# The jobs import Lightning, transformers and SAM-2 (~15 s on 2 cores), so each handler imports what it
# needs when it runs: `desa2va --help` and `desa2va shards` stay fast.


def _train(args: argparse.Namespace) -> None:
    from lightning_desa2va.pipeline import train_stage

    run = train_stage(compose_config(args.overrides, args.experiments_dir))
    _print_runs([run])


def _evaluate(args: argparse.Namespace) -> None:
    from lightning_desa2va.pipeline import evaluate_checkpoint

    cfg = compose_config(args.overrides, args.experiments_dir)
    scores, baseline = evaluate_checkpoint(cfg, args.checkpoint, args.split)
    print_summary(f"{args.checkpoint} on {args.split}", {"model": scores, "union of objects": baseline}, [])


def _demo(args: argparse.Namespace) -> None:
    from lightning_desa2va.pipeline import run_demo

    _print_runs(list(run_demo([DEMO_EXPERIMENT, *args.overrides], args.experiments_dir)))


def _pretrain_tiny(args: argparse.Namespace) -> None:
    from lightning_desa2va.foundations import SHIPPED_DIR, read_manifest
    from lightning_desa2va.pipeline import pretrain_foundations
    from lightning_desa2va.report import print_reproduction

    recipes = pretrain_foundations(args.overrides, args.out, args.experiments_dir)
    try:
        shipped = read_manifest(SHIPPED_DIR)["recipes"]
    except FileNotFoundError:
        shipped = {}
    print_reproduction(recipes, shipped, args.out)


def _shards_synthetic(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.shards import write_synthetic_benchmark
    from lightning_desa2va.data.synthetic import SyntheticConfig

    counts = {split: max(1, round(args.videos * share)) for split, share in SPLIT_FRACTIONS.items()}
    write_synthetic_benchmark(args.out, SyntheticConfig(), counts, args.seed, args.videos_per_shard)


def _shards_build(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.converters.build import build_shards

    report = build_shards(
        args.format,
        args.root,
        args.split,
        args.out,
        workers=args.workers,
        max_size=args.max_size,
        videos_per_shard=args.videos_per_shard,
        refs=args.refs,
        images=args.images,
    )
    rows = {"videos": report.videos, "expressions": report.expressions, "frames": report.frames}
    rows |= {f"skipped {reason}": count for reason, count in report.skipped.items() if count}
    rows["overlapping pixels"] = report.overlapping_pixels
    print_counts(f"{args.format} {args.split} -> {args.out} ({len(report.shards)} shards)", rows)


def _print_runs(runs: list[StageRun]) -> None:
    if not all("JF" in run.metrics for run in runs):
        print_metrics("metrics on val", {run.label: run.metrics for run in runs})
        return
    rows = {run.label: run.metrics for run in runs}
    rows["union of objects"] = runs[-1].baseline
    footer = [f"{run.label}: MLflow run {run.run_id}, outputs in {run.output_dir}" for run in runs]
    footer.append("Browse the runs with `make ui` (MLflow UI on http://127.0.0.1:5000).")
    print_summary("J&F on val", rows, footer)
