"""What the command line prints: whole tables anywhere, help that lists commands and variants, a step-counted
progress bar, and no third-party adverts."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_desa2va.callbacks import StepProgressBar
from lightning_desa2va.cli import build_parser, parse_arguments
from lightning_desa2va.config import config_groups
from lightning_desa2va.console import TextTable, markdown_table, print_table, quiet_third_party_output
from lightning_desa2va.report import COLUMNS, summary_table

ROWS = {
    "stage 2 (fused mask) with a long name": {"JF": 0.72, "JF/static": 0.832, "JF/motion": 0.699},
    "union of objects": {"JF": 0.494},
}


def test_summary_table_piped_to_a_file_keeps_every_header_and_figure_whole() -> None:
    stream = io.StringIO()  # not a terminal, as `make demo > demo.log` is
    print_table(
        summary_table("J&F on val", ROWS), ["outputs in /a/very/long/" + "folder/" * 20], stream=stream
    )
    text = stream.getvalue()
    for header in COLUMNS.values():
        assert f" {header} " in text, header
    for figure in ("0.720", "0.832", "0.699", "0.494"):
        assert figure in text
    assert "…" not in text
    assert "folder/" * 20 in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(ROWS) and len({len(line) for line in lines}) == 1  # aligned columns


def test_a_pipe_inside_a_markdown_cell_is_escaped_so_the_row_keeps_its_columns() -> None:
    table = TextTable("diagnostics", ["variant", "|cos(zt,zv)|"])
    table.add_row("a|b", "0.037")
    lines = markdown_table(table).splitlines()[2:]
    assert lines[0] == "| variant | \\|cos(zt,zv)\\| |"
    assert lines[2] == "| a\\|b    |          0.037 |"
    assert {line.replace("\\|", "").count("|") for line in lines} == {3}


def test_a_table_too_wide_for_the_terminal_prints_as_markdown(monkeypatch: pytest.MonkeyPatch) -> None:
    class NarrowTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "40")
    stream = NarrowTerminal()
    print_table(summary_table("J&F", ROWS), stream=stream)
    assert "| stage 2 (fused mask) with a long name |" in stream.getvalue()


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    table = TextTable("t", ["a", "b"])
    with pytest.raises(ValueError, match="2 columns"):
        table.add_row("only one")


def test_help_lists_every_subcommand_with_an_example() -> None:
    text = build_parser().format_help()
    for command in ("train", "eval", "demo", "pretrain-tiny", "shards"):
        assert f"    {command} " in text, command
        assert f"desa2va {command}" in text, command


def test_overrides_may_come_before_and_after_the_options() -> None:
    argv = ["sweep", "spec.yaml", "decoupler=mlp", "--workers", "2", "num_threads=1", "data.num_workers=0"]
    args = parse_arguments(build_parser(), argv)
    assert args.workers == 2
    assert args.overrides == ["decoupler=mlp", "num_threads=1", "data.num_workers=0"]


@pytest.mark.parametrize(
    "argv", [["sweep", "spec.yaml", "x=1", "--wrokers", "2"], ["shards", "synthetic", "--out", "data", "x=1"]]
)
def test_an_unknown_option_or_an_override_where_none_are_taken_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(build_parser(), argv)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_a_subcommand_help_lists_config_groups_with_their_variants(command: str) -> None:
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "==SUPPRESS==" or action.choices)
    text = subparsers.choices[command].format_help()
    for group, variants in config_groups().items():
        assert group in text and " | ".join(variants) in text, group


def test_lightning_adverts_are_dropped_and_other_messages_kept(caplog: pytest.LogCaptureFixture) -> None:
    quiet_third_party_output()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logger.info("GPU available: False")
    assert [record.msg for record in caplog.records] == ["GPU available: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party_output()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something the user can act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user can act on"]


def fit_with_bar(make_model, make_batch, build_stage, root: Path, bar) -> pl.Trainer:
    """Three steps over a stream of one batch, so every step is a new epoch (Lightning's own bar restarts)."""
    cfg, model = make_model("stage=text_pretrain")
    stage = build_stage(cfg, model)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[bar],
        default_root_dir=root,
    )
    torch.manual_seed(0)
    trainer.fit(stage, DataLoader([make_batch(model, ["red square"])], batch_size=None))
    assert trainer.current_epoch >= 2
    return trainer


def test_on_a_terminal_the_bar_counts_steps_of_max_steps_across_epochs(
    make_model, make_batch, build_stage, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich then draws as on a terminal
    bar = StepProgressBar(leave=True)
    fit_with_bar(make_model, make_batch, build_stage, tmp_path, bar)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (3, 3)
    assert task.description.strip().endswith("train steps")


def test_piped_the_bar_logs_evenly_spaced_lines_instead(
    make_model, make_batch, build_stage, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    bar = StepProgressBar(lines_when_piped=3)
    with caplog.at_level(logging.INFO, logger="lightning_desa2va.callbacks"):
        fit_with_bar(make_model, make_batch, build_stage, tmp_path, bar)  # pytest's capture is no terminal
    assert bar.progress is None  # no live bar drawn into a file
    lines = [record.getMessage() for record in caplog.records if record.name == "lightning_desa2va.callbacks"]
    assert [line.split(":")[0] for line in lines] == ["train steps 1/3", "train steps 2/3", "train steps 3/3"]
    assert all("train/loss" in line for line in lines)
