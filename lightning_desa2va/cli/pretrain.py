"""``desa2va pretrain-tiny``: train the tiny SAM-2 and VLM foundations from scratch and export them."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import add_command

DEFAULT_OUT = Path("outputs/foundations/tiny")


def register(commands: argparse._SubParsersAction) -> None:
    pretrain = add_command(
        commands,
        "pretrain-tiny",
        "train the tiny SAM-2 and VLM foundations from scratch (their recipes) and export them",
        "desa2va pretrain-tiny --out outputs/foundations/tiny",
        takes_overrides=True,
    )
    pretrain.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    pretrain.set_defaults(run=_pretrain_tiny)


def _pretrain_tiny(args: argparse.Namespace) -> None:
    from lightning_desa2va.foundations import SHIPPED_DIR, read_manifest
    from lightning_desa2va.pretrain import pretrain_foundations
    from lightning_desa2va.report import print_reproduction

    recipes = pretrain_foundations(args.overrides, args.out, args.experiments_dir)
    try:
        shipped = read_manifest(SHIPPED_DIR)["recipes"]
    except FileNotFoundError:
        shipped = {}
    print_reproduction(recipes, shipped, args.out)
