"""README.md is a user guide whose commands run as written: every fenced ``make`` / ``desa2va`` command names
a real Make target or subcommand, parses, and (for the subcommands that take overrides) composes a config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lightning_desa2va.cli import build_parser, parse_arguments
from lightning_desa2va.config import compose_config

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MAX_README_LINES = 300
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.DOTALL)
MAKE_RULE = re.compile(r"^([A-Za-z][\w -]*):", re.MULTILINE)  # "a b: ..." defines a and b
ENV_ASSIGNMENT = re.compile(r"^[A-Z_]+=\S+$")
OVERRIDE_COMMANDS = ("train", "eval", "demo", "predict")


def fenced_commands(prefix: str) -> list[str]:
    """Every command line in README's code fences that runs ``prefix`` (``make`` or ``desa2va``),
    continuation lines joined, comments and leading environment assignments dropped."""
    commands = []
    for block in FENCE.findall(README.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0], comments=True)
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words and Path(words[0]).name == prefix:
                commands.append(shlex.join(words))
    return commands


def test_readme_is_a_guide_of_at_most_300_lines() -> None:
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def test_readme_shows_the_test_and_demo_commands() -> None:
    assert {"make test", "make demo"} <= set(fenced_commands("make"))


@pytest.mark.parametrize("command", fenced_commands("make"))
def test_every_make_command_in_readme_names_a_real_target(command: str) -> None:
    rules = MAKE_RULE.findall((REPO_ROOT / "Makefile").read_text())
    targets = {target for rule in rules for target in rule.split()}
    named = [word for word in shlex.split(command)[1:] if "=" not in word]
    assert named and set(named) <= targets, f"{command}: {sorted(set(named) - targets)} not in the Makefile"


@pytest.mark.parametrize("command", fenced_commands("desa2va"))
def test_every_desa2va_command_in_readme_parses_and_composes(command: str) -> None:
    words = shlex.split(command)[1:]
    args = parse_arguments(build_parser(), words)  # exits (SystemExit) on an unknown subcommand or option
    overrides = getattr(args, "overrides", None)
    if words[0] in OVERRIDE_COMMANDS and overrides is not None:
        compose_config(list(overrides), REPO_ROOT / "experiments")
