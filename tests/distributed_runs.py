"""Helpers for tests that run two processes (DDP over gloo on the CPU), each with a deadline so that a hang
fails the test instead of the suite: one job that runs the tiny default's pipeline and then the Sa2VA
control's in the same two processes (each process start costs more than the training), its ranks noting the
training videos they read; and any function run on both ranks of a gloo group (``on_two_ranks``). Run as a
script this module is that job (Lightning starts rank 1 by running the same script again)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli_processes import SERVER

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
GROUP_DEADLINE_S = 60
"""Seconds two processes of a gloo group may take for a few collectives, process starts included."""
DEADLINE_S = 240
"""Seconds a two-process job may take (about 60 s on 2 busy cores): one still running then counts as hung."""
READ_LOG = "trained-{experiment}-{stage}-rank{rank}.jsonl"
"""Where each rank notes the videos of every batch a stage trained on, one JSON line per batch."""

PIPELINES = {
    "desa2va_tiny": ["experiment=desa2va_tiny", "pipeline.steps={text_pretrain:2,decoupled_finetune:2}"],
    # the control trains the sum of both stages' steps in its one stage
    "sa2va_baseline": ["experiment=sa2va_baseline", "pipeline.steps={text_pretrain:1,decoupled_finetune:1}"],
}
"""The pipelines the job runs, in order."""
STAGES = {"desa2va_tiny": ["text_pretrain", "decoupled_finetune"], "sa2va_baseline": ["decoupled_finetune"]}
"""The stages each pipeline trains."""

TINY = [
    "synthetic.videos={train:4,val:1,test:1}",
    "synthetic.videos_per_shard=2",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "stage.num_overlays=0",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "num_threads=1",
    "logger.log_model=false",
]
"""Two training shards of two videos, one validation video: 2 steps a stage, validated at the end."""
TWO_PROCESSES = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def run_job(root: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """Every pipeline of :data:`PIPELINES` with ``overrides`` (no test split) run in ``root`` by this
    script; past :data:`DEADLINE_S` its process group (both ranks) is killed and ``TimeoutExpired`` raised."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, str(Path(__file__).resolve()), *overrides]
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def on_two_ranks(work: Callable[[int, Path], None], folder: Path) -> None:
    """``work(rank, folder)`` in two processes joined in a gloo group (what Lightning's DDP starts on CPUs);
    fails when a rank fails, or hangs past :data:`GROUP_DEADLINE_S` (the ranks are then killed)."""
    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [SERVER.Process(target=_in_group, args=(rank, port, work, folder)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(GROUP_DEADLINE_S)
    hung = [process for process in ranks if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} rank(s) still waiting after {GROUP_DEADLINE_S} s"
    assert [process.exitcode for process in ranks] == [0, 0]


def _in_group(rank: int, port: int, work: Callable[[int, Path], None], folder: Path) -> None:
    import torch.distributed

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        work(rank, folder)
    finally:
        torch.distributed.destroy_process_group()


def trained_videos(root: Path, experiment: str, stage: str) -> dict[int, set[str]]:
    """The training videos each rank read in a stage, by rank."""
    return {
        rank: {video for line in path.read_text().splitlines() for video in json.loads(line)}
        for rank in range(2)
        if (path := root / READ_LOG.format(experiment=experiment, stage=stage, rank=rank)).is_file()
    }


def shard_of_videos(data_dir: Path) -> dict[str, str]:
    """Each training video's shard (a sample's key is its video id)."""
    return {
        member.name.split(".")[0]: shard.name
        for shard in sorted(data_dir.glob("train-*.tar"))
        for member in tarfile.open(shard).getmembers()
    }


def main(overrides: list[str]) -> None:
    import lightning.pytorch as pl

    from lightning_desa2va.pipeline import run_pipeline

    class NoteVideos(pl.Callback):
        def __init__(self, cfg: Any) -> None:
            self.experiment, self.stage = cfg.run.experiment, cfg.run.choices.stage

        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            name = READ_LOG.format(experiment=self.experiment, stage=self.stage, rank=trainer.global_rank)
            with Path(name).open("a") as log:
                log.write(json.dumps(batch["video_id"]) + "\n")

    for pipeline in PIPELINES.values():
        run_pipeline(
            [*pipeline, *overrides],
            EXPERIMENTS_DIR,
            stage_callbacks=lambda cfg: [NoteVideos(cfg)],
            score_test=False,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
