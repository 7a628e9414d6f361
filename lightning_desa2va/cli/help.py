"""What ``desa2va --help`` and each subcommand's ``--help`` show: an example per subcommand and the config
groups with their variants (read from the packaged config tree, without importing the model stack)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_desa2va.config import config_groups

EXAMPLES = """examples:
  desa2va demo                                   the main job: shards, stage 1, stage 2, scores
  desa2va train stage=text_pretrain decoupler=orthogonal
  desa2va eval outputs/.../checkpoints/last.ckpt stage=decoupled_finetune eval=sa2va --split test
  desa2va predict --video clip.mp4 --expression "the red circle" --ckpt outputs/.../last.ckpt
  desa2va export outputs/.../last.ckpt --out exports/desa2va   a Hugging Face folder, LoRA merged
  desa2va submit --ckpt exports/desa2va --data data/mevis --split valid --out submissions/mevis
  desa2va pretrain-tiny --out outputs/foundations/tiny
  desa2va sweep sweeps/ablate_decoupler.yaml --profile quick
  desa2va shards synthetic --out data/shapes --videos 480
  desa2va shards build --format mevis --root data/raw/mevis --split valid_u --as val --out data/mevis
  desa2va shards masks data/mevis --split val --out gt/mevis_val

Every subcommand's --help lists its options and the config groups with their variants."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the examples and the variant lists)."""


def variants_epilog() -> str:
    """Each config group with its variants, for the subcommands that take overrides."""
    lines = ["config groups (override as GROUP=VARIANT, any key as GROUP.KEY=VALUE):"]
    width = max(len(group) for group in config_groups())
    lines += [f"  {group:<{width}}  {' | '.join(names)}" for group, names in config_groups().items()]
    return "\n".join(lines)


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    example: str,
    takes_overrides: bool,
    positionals: Sequence[tuple[str, str]] = (),
) -> argparse.ArgumentParser:
    """A subcommand whose help gives its one-line summary, an example and (with overrides) the variants.

    ``positionals`` (name, help) come before the overrides: argparse gives a list of any length (the
    overrides) all but the positionals after it, so ``eval CKPT stage=...`` needs the checkpoint first."""
    epilog = f"example:\n  {example}"
    if takes_overrides:
        epilog += "\n\n" + variants_epilog()
    parser = commands.add_parser(
        name, help=summary, description=summary, epilog=epilog, formatter_class=HelpFormatter
    )
    for positional, help_text in positionals:
        parser.add_argument(positional, type=str, help=help_text)
    if takes_overrides:
        parser.add_argument(
            "overrides",
            nargs="*",
            help="Hydra overrides, e.g. decoupler=orthogonal fusion=dynamic loss.w_orth=0.1",
        )
    return parser
