"""Resuming: a stage's last.ckpt holds its final step, and a run resumed from it continues in the same folder
and MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import ensure_synthetic_shards, train_stage

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
TINY_STAGE = [
    "stage=text_pretrain",
    "synthetic.videos={train:4,val:1,test:1}",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "stage.num_overlays=0",
    "trainer.log_every_n_steps=1",
]


def test_a_resumed_run_continues_in_its_folder_and_mlflow_run(tmp_path: Path, in_scratch_folder) -> None:
    with in_scratch_folder(tmp_path) as store:
        first_cfg = compose_config(
            [*TINY_STAGE, "trainer.max_steps=2", "trainer.val_check_interval=2", store]
        )
        ensure_synthetic_shards(first_cfg)
        first = train_stage(first_cfg)
        resumed_cfg = compose_config(
            [*TINY_STAGE, "trainer.max_steps=5", "trainer.val_check_interval=2", store]
            + [f"resume_from={first.checkpoint}"]
        )
        resumed = train_stage(resumed_cfg)
    assert resumed.output_dir == first.output_dir
    assert resumed.run_id == first.run_id
    assert torch.load(resumed.checkpoint, weights_only=True)["global_step"] == 5
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [point.step for point in client.get_metric_history(first.run_id, "train/loss")]
    assert steps == [0, 1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(list((tmp_path / "outputs" / "default" / "text_pretrain").iterdir())) == 1


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
