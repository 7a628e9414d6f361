"""``desa2va``: the console entry point. Each subcommand lives in its own module of this package and
registers itself with :func:`build_parser`; the training subcommands take Hydra overrides
(``decoupler=orthogonal fusion=dynamic loss.w_orth=0.1``)."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from hydra.errors import HydraException, InstantiationException

from lightning_desa2va.cli import export, predict, pretrain, runs, services, shards, submit, sweep
from lightning_desa2va.cli.help import EXAMPLES, HelpFormatter
from lightning_desa2va.config import ConfigError
from lightning_desa2va.console import quiet_third_party_output
from lightning_desa2va.data.schema import ShardFormatError
from lightning_desa2va.errors import (
    CheckpointError,
    ExpressionError,
    NonFiniteLossError,
    ResumeError,
    RunInterrupted,
    ServiceError,
    VideoError,
    WeightsFormatError,
)
from lightning_desa2va.signals import STOP_SIGNALS, stop_at_once

LIGHTNING_LOGGER = "lightning"
COMMAND_MODULES = (runs, predict, export, submit, pretrain, shards, sweep, services)
"""Modules with a ``register(commands)`` function, in the order ``--help`` lists their subcommands."""

USER_ERRORS = (
    HydraException,
    ConfigError,
    ShardFormatError,
    WeightsFormatError,
    FileNotFoundError,
    CheckpointError,
    VideoError,
    ExpressionError,
    ResumeError,
    NonFiniteLossError,
    ServiceError,
)
"""Errors that are the input's fault (or say all there is to say, like a NaN loss): printed as one line naming
it, without a traceback."""
WORKER_PREFIX = "Caught "
ORIGINAL_TRACEBACK = "Original Traceback"
"""How torch re-raises an error from a DataLoader worker: a new error of the same type whose message is the
worker's whole traceback; the original message is its last line."""


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it; bad input ends with its message alone, not a traceback."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning prints its own messages through its own handler; propagating them too would print twice.
    logging.getLogger(LIGHTNING_LOGGER).propagate = False
    quiet_third_party_output()
    # training listens itself (saving first); elsewhere a command stops at once
    previous = {signum: signal.signal(signum, stop_at_once) for signum in STOP_SIGNALS}
    try:
        args.run(args)
    except USER_ERRORS as error:
        # Hydra wraps what a component raised while being built; its cause names the bad input.
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        parser.exit(2, f"desa2va: error: {user_message(cause)}\n")
    except RunInterrupted as interrupted:
        parser.exit(interrupted.exit_code, f"desa2va: {interrupted}\n")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def user_message(error: BaseException) -> str:
    """An error's message, or for one raised in a DataLoader worker the worker's own message (the last line
    of the traceback torch puts in its place), without the exception's class name."""
    text = str(error)
    if not (text.startswith(WORKER_PREFIX) and ORIGINAL_TRACEBACK in text):
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(error).__name__}: "
    return last.split(prefix, 1)[1] if prefix in last else last


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting overrides also follow the options (``sweep SPEC --workers 2 x=1``).

    argparse fills a subcommand's list of overrides where its positionals start, so overrides written
    after an option come back unrecognised; those join the overrides, anything else is an error."""
    args, leftover = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unrecognised = [arg for arg in leftover if arg.startswith("-") or not takes_overrides]
    if unrecognised:
        parser.error(f"unrecognized arguments: {' '.join(unrecognised)}")
    if leftover:
        args.overrides = [*args.overrides, *leftover]
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desa2va",
        description="DeSa2VA-style referring video segmentation with swappable components (Lightning).",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--experiments-dir", type=Path, default=None, help="folder of experiment YAMLs")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", title="commands")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser
