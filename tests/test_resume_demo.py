"""A demo killed (SIGKILL) in stage 2 and run again with ``resume=auto`` continues with stage 1 reused, as it
finished, and prints the uninterrupted demo's table (its own module, so that the two workers share the resume
tests)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from interruptions import EXPERIMENTS_DIR, TINY_DEMO, desa2va, die_at_step

from lightning_desa2va.pipeline import run_pipeline
from lightning_desa2va.runs import FINISHED, read_pipeline, read_record

pytestmark = pytest.mark.long(seconds=13)


def test_a_demo_killed_in_stage_2_resumes_with_stage_1_reused_and_prints_the_same_table(
    tmp_path: Path, in_scratch_folder
) -> None:
    with in_scratch_folder(tmp_path) as store:
        overrides = [*TINY_DEMO, store]
        text, finetune = run_pipeline(overrides, EXPERIMENTS_DIR)
    assert die_at_step(tmp_path, "demo", "decoupled_finetune", 5, overrides) == -signal.SIGKILL
    outputs = tmp_path / "outputs" / "desa2va_tiny"
    (pipeline,) = [
        folder
        for folder in (outputs / "pipelines").iterdir()
        if str(text.output_dir) not in read_pipeline(folder).stages.values()
    ]
    stage_1 = Path(read_pipeline(pipeline).stages["text_pretrain"])
    stage_1_record = read_record(stage_1)
    assert stage_1_record.status == FINISHED

    result = desa2va(tmp_path, "demo", *overrides, "resume=auto")

    assert result.returncode == 0, result.stderr[-3000:]
    assert read_pipeline(pipeline).status == FINISHED
    assert read_record(stage_1) == stage_1_record  # reused, not trained again
    assert len(list((outputs / "text_pretrain").iterdir())) == 2
    stage_2 = read_record(Path(read_pipeline(pipeline).stages["decoupled_finetune"]))
    assert stage_2.results["val"] == finetune.metrics
    assert stage_2.results["test"] == finetune.test_metrics
    for score in (text.metrics["JF"], finetune.metrics["JF"], finetune.test_metrics["JF"]):
        assert f"{score:.3f}" in result.stdout
    assert "stage 2 (fused mask): no sample skipped" in result.stdout
