"""End to end: the demo pipeline on a tiny benchmark, read back from the MLflow store it wrote."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from lightning_desa2va.config import compose_config
from lightning_desa2va.data.shards import read_manifest
from lightning_desa2va.pipeline import (
    DATA_LOCK_SUFFIX,
    ensure_synthetic_shards,
    evaluate_checkpoint,
    run_pipeline,
)
from lightning_desa2va.runs import read_record

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
LOCK_WAIT_S = 1.0
TINY_RUN = [
    "experiment=desa2va_tiny",
    "synthetic.videos={train:6,val:2,test:2}",
    "synthetic.videos_per_shard=3",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=4",
    "stage.num_overlays=2",
    "loss.w_t=0.25",
]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder) -> tuple[Path, tuple]:
    """Run the demo once in a scratch folder."""
    root = tmp_path_factory.mktemp("demo")
    with in_scratch_folder(root) as store:
        runs = run_pipeline([*TINY_RUN, store], EXPERIMENTS_DIR)
    return root, runs


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _mlflow_runs(root: Path) -> dict:
    client = _client(root)
    experiment = client.get_experiment_by_name("desa2va")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_demo_writes_shards_and_returns_both_stages_with_baseline(demo_store):
    root, (text_run, finetune_run) = demo_store
    assert sorted(p.name for p in (root / "data" / "shapes").glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    for run in (text_run, finetune_run):
        assert 0.0 <= run.metrics["JF"] <= 1.0
        assert run.checkpoint.is_file()
    assert 0.0 < finetune_run.baseline["JF"] <= 1.0
    # the last stage is also scored on the test split, beside the baseline there
    assert not text_run.test_metrics
    assert 0.0 <= finetune_run.test_metrics["JF"] <= 1.0
    assert 0.0 < finetune_run.test_baseline["JF"] <= 1.0


def test_run_folders_are_named_by_experiment_stage_time_and_run_id(demo_store):
    root, runs = demo_store
    for run, stage in zip(runs, ("text_pretrain", "decoupled_finetune"), strict=True):
        relative = run.output_dir.relative_to(root / "outputs")
        assert relative.parts[:2] == ("desa2va_tiny", stage)
        stamp, short_id = relative.parts[2].split("_")
        assert len(stamp) == len("20261202-063012") and short_id == run.run_id[:8]
        assert run.checkpoint.parent == run.output_dir / "checkpoints"
        record = read_record(run.output_dir)
        assert (record.mlflow_run_id, record.stage, record.experiment) == (run.run_id, stage, "desa2va_tiny")
        payload = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
        kept = sum(key.startswith("model.") for key in payload["state_dict"])
        assert record.checkpoint_weights == {
            "model_tensors_kept": kept,
            "rebuilt_from_base": len(payload["desa2va"]["rebuilt"]),
        }
        assert record.checkpoint_weights["rebuilt_from_base"] > 0  # the frozen foundations are not saved


def test_mlflow_holds_one_finished_run_per_stage_with_params_and_metrics(demo_store):
    root, _ = demo_store
    runs = _mlflow_runs(root)
    assert set(runs) == {"text_pretrain", "decoupled_finetune"}
    finetune = runs["decoupled_finetune"]
    assert finetune.info.status == "FINISHED"
    params = finetune.data.params
    assert params["decoupler/_target_"] == "lightning_desa2va.models.decoupler.LinearOrthoDecoupler"
    assert params["fusion/_target_"] == "lightning_desa2va.models.fusion.DynamicFusion"
    assert float(params["loss/w_t"]) == 0.25
    for run in runs.values():
        for name in ("train/loss", "val/JF", "val/J", "val/F", "val/union_baseline/JF"):
            assert name in run.data.metrics, f"{run.info.run_name} lacks {name}"
        assert len(_client(root).get_metric_history(run.info.run_id, "train/loss")) >= 1
        assert run.data.tags["experiment"] == "desa2va_tiny"
        assert run.data.tags["decoupler"] == "linear_ortho"
    for name in ("test/JF", "test/union_baseline/JF"):
        assert name in finetune.data.metrics
    experiment = _client(root).get_experiment_by_name("desa2va")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_mlflow_artifacts_hold_config_checkpoint_and_overlays(demo_store, tmp_path):
    root, (text_run, _) = demo_store
    client = _client(root)
    for name, run in _mlflow_runs(root).items():
        files = _artifact_files(client, run.info.run_id)
        config_file = client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path / name))
        config = OmegaConf.load(config_file)
        assert config.logger.run_name == name

        checkpoints = [f for f in files if f.endswith(".ckpt")]
        assert checkpoints, f"{name} logged no checkpoint: {files}"
        local = client.download_artifacts(run.info.run_id, checkpoints[0], str(tmp_path / name))
        state = torch.load(local, map_location="cpu", weights_only=True)["state_dict"]
        assert any(key.startswith("model.sam.sam_mask_decoder.") for key in state)

        overlays = [f for f in files if f.startswith("overlays/") and f.endswith(".png")]
        assert overlays, f"{name} logged no overlay: {files}"
        image = Image.open(client.download_artifacts(run.info.run_id, overlays[0], str(tmp_path / name)))
        assert image.width > image.height > 0

        if name == "decoupled_finetune":
            assert config.stage.init_from == str(text_run.checkpoint)


def test_eval_of_the_stage_2_checkpoint_reproduces_its_validation(demo_store) -> None:
    root, (_, finetune_run) = demo_store
    cfg = compose_config([*TINY_RUN, "stage=decoupled_finetune"], EXPERIMENTS_DIR)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        scores, baseline = evaluate_checkpoint(cfg, finetune_run.checkpoint, "val")
    assert scores.keys() == finetune_run.metrics.keys()
    for name, value in finetune_run.metrics.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    assert baseline == pytest.approx(finetune_run.baseline)


def test_processes_started_together_write_the_synthetic_shards_once(tmp_path: Path) -> None:
    """A writer waits on the folder's lock while another holds it (torchrun's ranks, a sweep's workers),
    then finds the shards there."""
    cfg = compose_config([*TINY_RUN, f"paths.data_dir={tmp_path / 'shapes'}"], EXPERIMENTS_DIR)
    lock = FileLock(tmp_path / f"shapes{DATA_LOCK_SUFFIX}")
    with lock:
        waiting = threading.Thread(target=ensure_synthetic_shards, args=(cfg,))
        waiting.start()
        waiting.join(timeout=LOCK_WAIT_S)
        assert waiting.is_alive() and not (tmp_path / "shapes").exists()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and read_manifest(tmp_path / "shapes")["splits"]
