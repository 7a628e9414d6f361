"""What a stopped or refused run leaves: SIGTERM / SIGINT save ``last.ckpt`` at the signal's step and exit
with 128 + signum; a resume is checked before anything is reopened (safe loading whatever the environment
says, a cut checkpoint, the config and the tracking URI), and a refused one changes nothing."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from interruptions import TINY_STAGE, start_desa2va
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from lightning_desa2va.cli import main
from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.runs import FINISHED, INTERRUPTED, RUN_FILE, read_record
from lightning_desa2va.training import StageRun, train_stage

pytestmark = pytest.mark.long(seconds=13)

STEP_LINE = re.compile(r"train steps (\d+)/")
SIGNAL_AFTER_STEP = 3
LONG = [
    "trainer.max_steps=2000",
    "trainer.val_check_interval=1000",
    "trainer.callbacks.progress.lines_when_piped=2000",
]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_ckpt_at_its_step_and_exits_with_128_plus_it(
    tmp_path: Path, in_scratch_folder, signum: int, exit_code: int
) -> None:
    with in_scratch_folder(tmp_path) as store:
        overrides = [*TINY_STAGE, *LONG, store]
        ensure_synthetic_shards(compose_config(overrides))
    process = start_desa2va(tmp_path, "train", *overrides)
    for line in process.error_lines():  # a log line per step: signal once a few steps are done
        if (match := STEP_LINE.search(line)) and int(match[1]) >= SIGNAL_AFTER_STEP:
            break
    process.send_signal(signum)
    log = process.result(timeout=300).stderr

    assert process.returncode == exit_code, log[-3000:]
    last = log.strip().splitlines()[-1]
    stopped = re.fullmatch(
        rf"desa2va: {signal.Signals(signum).name}: stopped at step (\d+), saved (\S+)", last
    )
    assert stopped, last
    step, checkpoint = int(stopped[1]), Path(stopped[2])
    assert SIGNAL_AFTER_STEP <= step < 2000
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step
    record = read_record(checkpoint.parent.parent)
    assert record.status == INTERRUPTED
    client = MlflowClient(tracking_uri=store.split("=", 1)[1])
    assert client.get_run(record.mlflow_run_id).info.status == "KILLED"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder) -> tuple[Path, list[str], StageRun]:
    """A finished tiny run: its scratch folder, the overrides that made it and the run."""
    root = tmp_path_factory.mktemp("finished")
    with in_scratch_folder(root) as store:
        overrides = [*TINY_STAGE, "trainer.max_steps=4", "trainer.val_check_interval=4", store]
        cfg = compose_config(overrides)
        ensure_synthetic_shards(cfg)
        return root, overrides, train_stage(cfg)


def refusal(root: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """``desa2va train ARGS`` in ``root``: it must stop with status 2 and one line, which is returned."""
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *args])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("desa2va: error: "), lines
    return lines[0]


def snapshot(root: Path, run: StageRun) -> tuple:
    """What a refused resume must leave as it was: the run folders, the run record and the MLflow status."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    folders = sorted(str(path) for path in (root / "outputs").rglob(RUN_FILE))
    status = client.get_run(run.run_id).info.status
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return folders, (run.output_dir / RUN_FILE).read_bytes(), status, len(client.search_runs(experiments))


def test_a_planted_pickle_is_refused_in_one_line_even_when_unsafe_loading_is_forced(
    finished, tmp_path: Path, capsys, monkeypatch
) -> None:
    root, overrides, run = finished
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = run.output_dir / "checkpoints" / "planted.ckpt"
    torch.save({**torch.load(run.checkpoint, weights_only=True), "extra": Payload()}, planted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    before = snapshot(root, run)

    line = refusal(root, capsys, monkeypatch, *overrides, f"resume_from={planted}")

    assert "refuses" in line and str(planted) in line
    assert not marker.exists()
    assert snapshot(root, run) == before


def test_a_checkpoint_cut_in_half_is_refused_in_one_line(finished, capsys, monkeypatch) -> None:
    root, overrides, run = finished
    cut = run.output_dir / "checkpoints" / "cut.ckpt"
    whole = run.checkpoint.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    before = snapshot(root, run)

    line = refusal(root, capsys, monkeypatch, *overrides, f"resume_from={cut}")

    assert f"{cut} is truncated" in line
    assert snapshot(root, run) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["trainer.max_steps=6"], "trainer.max_steps: 4 → 6"),
        (["logger.tracking_uri=sqlite:///elsewhere.db"], "elsewhere.db"),
    ],
)
def test_a_refused_resume_leaves_the_finished_run_finished_and_everything_as_it_was(
    finished, capsys, monkeypatch, change: list[str], named: str
) -> None:
    root, overrides, run = finished
    before = snapshot(root, run)

    line = refusal(root, capsys, monkeypatch, *overrides, *change, f"resume_from={run.checkpoint}")

    assert f"cannot resume {run.output_dir}" in line and named in line
    assert snapshot(root, run) == before
    assert before[2] == "FINISHED" and read_record(run.output_dir).status == FINISHED


class ValidationBatches(Callback):
    """The number of batches each validation run scored, in order."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runs.append(0)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.runs[-1] += 1


def test_training_may_validate_on_a_subset_but_the_run_is_scored_on_the_whole_split(
    tmp_path: Path, in_scratch_folder
) -> None:
    with in_scratch_folder(tmp_path) as store:
        overrides = [
            *TINY_STAGE,
            "synthetic.videos={train:4,val:3,test:1}",
            "data.eval_batch_size=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            store,
        ]
        cfg = compose_config(overrides)
        ensure_synthetic_shards(cfg)
        counter = ValidationBatches()
        run = train_stage(cfg, callbacks=[counter])
    *during_training, final = counter.runs
    assert during_training == [1, 1]
    assert final > 1
    assert "JF" in run.metrics
