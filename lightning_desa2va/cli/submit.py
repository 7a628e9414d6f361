"""``desa2va submit``: a stage-2 model over a converted split in the benchmark servers' layout, zipped for a
split without ground truth, scored offline for a split with it."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import add_command


def register(commands: argparse._SubParsersAction) -> None:
    submit = add_command(
        commands,
        "submit",
        "infer a converted split as Annotations/<video>/<expression>/<frame>.png: zipped, or scored offline",
        "desa2va submit --ckpt outputs/.../last.ckpt --data data/mevis --split valid --out submissions/mevis "
        "experiment=desa2va_1b",
        takes_overrides=True,
    )
    submit.add_argument("--ckpt", type=Path, required=True, help="a stage-2 checkpoint or export folder")
    submit.add_argument("--data", type=Path, required=True, help="a folder of converted shards")
    submit.add_argument("--split", required=True, help="the converted split (desa2va shards build --as NAME)")
    submit.add_argument("--out", type=Path, required=True, help="where Annotations/ and the zip go")
    submit.set_defaults(run=_submit)


def _submit(args: argparse.Namespace) -> None:
    from lightning_desa2va.predict import predict_config
    from lightning_desa2va.report import print_summary
    from lightning_desa2va.submit import RECORD_NAME, submit

    cfg = predict_config(args.overrides, args.ckpt, args.experiments_dir)
    result = submit(cfg, args.ckpt, args.data, args.split, args.out)
    done = f"{result.expressions} expressions ({result.inferred} inferred now) under eval={result.eval}"
    if result.zip_file:
        print(f"{done}: {result.zip_file} for the benchmark server; record in {args.out / RECORD_NAME}")
    else:
        print_summary(f"{args.ckpt} on {args.split} ({done})", {"model": result.scores})
