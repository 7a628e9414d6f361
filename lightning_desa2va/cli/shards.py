"""``desa2va shards``: write WebDataset shards (the synthetic benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import HelpFormatter

SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def register(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards",
        help="write WebDataset shards of the sample schema",
        description="Write WebDataset shards of the sample schema.",
        epilog="example:\n  desa2va shards synthetic --out data/shapes --videos 480",
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


def _shards_synthetic(args: argparse.Namespace) -> None:
    from lightning_desa2va.data.shards import write_synthetic_benchmark
    from lightning_desa2va.data.synthetic import SyntheticConfig

    counts = {split: max(1, round(args.videos * share)) for split, share in SPLIT_FRACTIONS.items()}
    write_synthetic_benchmark(args.out, SyntheticConfig(), counts, args.seed, args.videos_per_shard)
