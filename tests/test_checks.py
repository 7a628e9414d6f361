"""Mistakes stop in one line naming what is wrong: mistyped values at compose time, a NaN loss (naming the
step, the term and the videos, leaving no run behind when nothing was saved yet), a data error raised inside a
loader worker; a diverging loss is warned about; checkpoints and the MLflow store are never left half made."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_processes import SERVER
from interruptions import TINY_STAGE
from mlflow.tracking import MlflowClient
from store_creation import create_store

from lightning_desa2va.callbacks import DivergenceWarning
from lightning_desa2va.checkpointing import AtomicCheckpointIO
from lightning_desa2va.cli import main
from lightning_desa2va.config import compose_config
from lightning_desa2va.errors import CheckpointError
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.runs import FAILED, read_record

pytestmark = pytest.mark.long(seconds=17)  # the racing first runs start a fork server


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """``desa2va ARGS`` must stop with status 2, its error one line after the log, with no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("desa2va: error: "), err[-3000:]
    return last


def tiny_training_error(capsys: pytest.CaptureFixture, in_scratch_folder, folder: Path, *extra: str) -> str:
    """``desa2va train`` of the tiny stage with ``extra`` overrides in a scratch ``folder`` (its shards
    written first): the one error line it stops with."""
    with in_scratch_folder(folder) as store:
        overrides = [*TINY_STAGE, *extra, store]
        ensure_synthetic_shards(compose_config(overrides))
        return one_line_error(capsys, "train", *overrides)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=0", "'trainer.max_steps' is 0: it must be >= 1"),
        ("loss.w_t=-0.5", "'loss.w_t' is -0.5: it must be >= 0"),
        ("loss.w_orth=nan", "'loss.w_orth' is nan: it must be a finite number >= 0"),
        ("loss.w_v=inf", "'loss.w_v' is inf: it must be a finite number >= 0"),
        ("data.batch_size=-1", "'data.batch_size' is -1: it must be >= 1"),
        ("model.sam2.cache_frames=-1", "'model.sam2.cache_frames' is -1: it must be >= 0"),
        ("data.keep_frames=-2", "'data.keep_frames' is -2: it must be >= 0"),
        (
            "loss.mask.importance_sample_ratio=1.5",
            "'loss.mask.importance_sample_ratio' is 1.5: it must be in [0, 1]",
        ),
        ("resume=yes", "'resume' has value 'yes'"),
    ],
)
def test_a_mistyped_value_stops_in_one_line_naming_its_key_and_range(capsys, override, expected) -> None:
    assert expected in one_line_error(capsys, "train", override)


def test_a_gpu_config_on_a_machine_without_a_gpu_stops_in_one_line_before_any_run(
    tmp_path: Path, in_scratch_folder, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = tiny_training_error(capsys, in_scratch_folder, tmp_path, "trainer=gpu")
    assert "trainer.accelerator is 'gpu' but torch sees no CUDA GPU" in line and "trainer=cpu" in line
    assert not list((tmp_path / "outputs").rglob("run.json"))


def test_several_devices_without_a_chosen_strategy_stop_in_one_line_before_any_run(
    tmp_path: Path, in_scratch_folder, capsys
) -> None:
    line = tiny_training_error(capsys, in_scratch_folder, tmp_path, "trainer.devices=2")
    assert "trainer.devices=2 trainer.num_nodes=1 with strategy=auto: choose strategy=ddp" in line
    assert not list((tmp_path / "outputs").rglob("run.json"))


def test_a_nan_loss_stops_in_one_line_naming_the_step_the_term_and_the_videos(
    tmp_path: Path, in_scratch_folder, capsys
) -> None:
    extra = ("stage.optimizer.lr=1e30", "trainer.gradient_clip_val=0")
    line = tiny_training_error(capsys, in_scratch_folder, tmp_path, *extra)
    assert re.search(r"loss is (nan|inf) \(term \w+ = (nan|inf)\) at step [1-9]", line), line
    assert "on videos [" in line and "no checkpoint saved yet" in line
    (record,) = (tmp_path / "outputs").rglob("run.json")  # it trained a step: kept, failed, to look at
    assert read_record(record.parent).status == FAILED


def test_a_data_error_in_a_loader_worker_reaches_the_user_as_its_own_line(
    tmp_path: Path, in_scratch_folder, capsys
) -> None:
    with in_scratch_folder(tmp_path) as store:
        overrides = [*TINY_STAGE, "data.on_error=raise", "data.num_workers=1", store]
        ensure_synthetic_shards(compose_config(overrides))
        shard = tmp_path / "data" / "shapes" / "train-000000.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 7])
        line = one_line_error(capsys, "train", *overrides)
    assert line.startswith(f"desa2va: error: shard {shard.relative_to(tmp_path)}: ") and "truncated" in line
    assert "DataLoader worker" not in line
    assert not list((tmp_path / "outputs").rglob("run.json"))  # it failed before a step: nothing left
    client = MlflowClient(tracking_uri=store.split("=", 1)[1])
    experiment = client.get_experiment_by_name("desa2va")
    assert client.search_runs([experiment.experiment_id]) == []  # deleted, not left FAILED


def test_a_diverging_loss_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    watch = DivergenceWarning(factor=100, smoothing=0.5)
    losses = [1.0, 0.5, 0.2, 0.3, 5.0, 80.0, 1e4, 1e7, 1e9]
    with caplog.at_level(logging.WARNING):
        for step, loss in enumerate(losses):
            watch.on_train_batch_end(
                SimpleNamespace(global_step=step), None, {"loss": torch.tensor(loss)}, {}, step
            )
    warnings = [record.getMessage() for record in caplog.records if "diverging" in record.getMessage()]
    assert len(warnings) == 1
    assert "at step 5" in warnings[0] and "lower stage.optimizer.lr" in warnings[0]


def test_steady_noisy_losses_give_no_divergence_warning(caplog: pytest.LogCaptureFixture) -> None:
    watch = DivergenceWarning(factor=100, smoothing=0.1)
    noise = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING):
        for step in range(500):
            loss = 0.05 + torch.rand((), generator=noise) * 2.0
            watch.on_train_batch_end(SimpleNamespace(global_step=step), None, {"loss": loss}, {}, step)
    assert not [record for record in caplog.records if "diverging" in record.getMessage()]


class FullDisk:
    """Pickled halfway through a checkpoint: the disk fills up."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(CheckpointError, match="No space left on device; the previous one is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2, "x": FullDisk()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [file.name for file in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_first_runs_on_a_fresh_mlflow_store_do_not_race(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [SERVER.Process(target=create_store, args=(uri,)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
