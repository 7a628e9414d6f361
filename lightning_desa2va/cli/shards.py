"""``desa2va shards``: write WebDataset shards (the synthetic benchmark, or a dataset converted from the
layout it ships in), and write a converted split's ground truth back out in the benchmarks' layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import HelpFormatter
from lightning_desa2va.data.converters import DEFAULT_VIDEOS_PER_SHARD, FORMATS

SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
BUILD_EXAMPLE = (
    "desa2va shards build --format mevis --root data/raw/mevis --split valid_u --as val --out data/mevis"
)
MASKS_EXAMPLE = "desa2va shards masks data/mevis --split val --out gt/mevis_val"


def register(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards",
        help="write WebDataset shards of the sample schema",
        description="Write WebDataset shards of the sample schema.",
        epilog=(
            f"examples:\n  desa2va shards synthetic --out data/shapes --videos 480\n  {BUILD_EXAMPLE}\n"
            f"  {MASKS_EXAMPLE}"
        ),
        formatter_class=HelpFormatter,
    )
    sources = shards.add_subparsers(required=True, metavar="SOURCE", title="sources")
    synthetic = sources.add_parser(
        "synthetic",
        help="the synthetic moving-shapes benchmark, split 80/10/10",
        epilog="example:\n  desa2va shards synthetic --out data/shapes --videos 480 --seed 0",
        formatter_class=HelpFormatter,
    )
    synthetic.add_argument("--out", type=Path, required=True, help="folder for the shards")
    synthetic.add_argument("--videos", type=int, required=True, help="videos in all, split 80/10/10")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--videos-per-shard", type=int, default=100)
    synthetic.set_defaults(run=_shards_synthetic)

    build = sources.add_parser(
        "build",
        help="a dataset converted from the layout it ships in (docs/data.md)",
        description="Convert one split of MeViS, ReVOS, Ref-YouTube-VOS, Ref-DAVIS17 or RefCOCO(+/g) from "
        "the layout it ships in; prints the count of videos, expressions, frames and skipped items.",
        epilog=f"example:\n  {BUILD_EXAMPLE} --workers 2 --max-size 1024",
        formatter_class=HelpFormatter,
    )
    build.add_argument("--format", required=True, choices=FORMATS)
    build.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    build.add_argument("--split", required=True, help="e.g. train, valid_u; RefCOCO: train, val, testA ...")
    build.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest.json")
    build.add_argument("--as", dest="out_split", default=None, help="split name to write (train, val, test)")
    build.add_argument("--workers", type=_positive, default=1, help="processes converting videos")
    build.add_argument("--max-size", type=_positive, default=None, help="frames' longer side at most (px)")
    build.add_argument("--videos-per-shard", type=_positive, default=DEFAULT_VIDEOS_PER_SHARD)
    build.add_argument("--refs", default=None, help="RefCOCO: the refs file when the root has several")
    build.add_argument("--images", type=Path, default=None, help="RefCOCO: the COCO train2014 image folder")
    build.set_defaults(run=_shards_build)

    masks = sources.add_parser(
        "masks",
        help="a converted split's ground truth as <out>/<video>/<expression id>/<frame>.png",
        description="Write each expression's ground-truth target mask per frame of a converted split, at the "
        "video's own size (255 on the target), named by the dataset's own ids: the layout benchmark servers "
        "take, so a conversion can be checked against its source.",
        epilog=f"example:\n  {MASKS_EXAMPLE}",
        formatter_class=HelpFormatter,
    )
    masks.add_argument("data_dir", type=Path, help="a folder of converted shards (with manifest.json)")
    masks.add_argument("--split", required=True, help="the split to write (train, val, test, ...)")
    masks.add_argument("--out", type=Path, required=True, help="folder to write the masks under")
    masks.set_defaults(run=_shards_masks)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shards_synthetic(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.shards import write_synthetic_benchmark
    from lightning_desa2va.data.synthetic import SyntheticConfig

    counts = {split: max(1, round(args.videos * share)) for split, share in SPLIT_FRACTIONS.items()}
    write_synthetic_benchmark(args.out, SyntheticConfig(), counts, args.seed, args.videos_per_shard)


def _shards_build(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.converters.build import build_shards
    from lightning_desa2va.report import print_counts

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
        out_split=args.out_split,
    )
    rows = {"videos": report.videos, "expressions": report.expressions, "frames": report.frames}
    rows |= {f"skipped: {reason}": count for reason, count in report.skipped.items() if count}
    rows["overlapping mask pixels"] = report.overlapping_pixels
    written = f"{args.out}/{report.split}-*.tar ({len(report.shards)} shards)"
    if not report.ground_truth:
        written += ", no ground truth (a split published without masks: for desa2va submit)"
    print_counts(f"{args.format} {args.split} -> {written}", rows)


def _shards_masks(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.layout import write_ground_truth

    written = write_ground_truth(args.data_dir, args.split, args.out)
    print(f"ground truth of {written} expressions of {args.data_dir} {args.split} in {args.out}")
