"""``desa2va export``: a fine-tuned stage-2 checkpoint as a Hugging Face folder (LoRA merged, ``[SEG]`` in the
tokenizer, SAM-2 and the DeSa2VA modules beside it, a model card) that ``predict`` and ``eval`` read."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import add_command

EXPORT_ON_CPU = "trainer.accelerator=cpu"
"""Exports are built on the CPU, where the frozen weights stay as loaded (fp32), not in the run's bf16."""


def register(commands: argparse._SubParsersAction) -> None:
    export = add_command(
        commands,
        "export",
        "a stage-2 checkpoint as a Hugging Face folder (LoRA merged) that predict and eval read back",
        "desa2va export outputs/.../checkpoints/last.ckpt --out exports/desa2va_1b experiment=desa2va_1b",
        takes_overrides=True,
        positionals=[("checkpoint", "a stage-2 (decoupled_finetune) checkpoint")],
    )
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    export.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    from lightning_desa2va.config import compose_config
    from lightning_desa2va.console import TextTable, print_table
    from lightning_desa2va.export import export
    from lightning_desa2va.predict import PREDICT_STAGE

    cfg = compose_config([*PREDICT_STAGE, *args.overrides, EXPORT_ON_CPU], args.experiments_dir)
    result = export(cfg, Path(args.checkpoint), args.out)
    table = TextTable(f"{args.checkpoint} -> {result.out}", ["part", "parameters", "base model", "bytes"])
    for size in result.sizes:
        table.add_row(size.part, f"{size.exported:,}", f"{size.base:,}", f"{size.bytes:,}")
    print_table(table, [f"predict and eval read it as a checkpoint: desa2va predict --ckpt {result.out} ..."])
