"""``pretrain-tiny`` end to end on a tiny benchmark: both recipes train, export, and load back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from lightning_desa2va.foundations import SAM2_WEIGHTS, SHIPPED_DIR, VLM_WEIGHTS, verify_foundations
from lightning_desa2va.pretrain import pretrain_foundations

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
TINY_RECIPES = [
    "synthetic.videos={train:4,val:2,test:1}",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=2",
]


@pytest.fixture(scope="module")
def foundations(tmp_path_factory: pytest.TempPathFactory, in_scratch_folder) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pretrain")
    with in_scratch_folder(root) as store:
        recipes = pretrain_foundations([*TINY_RECIPES, store], root / "weights", EXPERIMENTS_DIR)
    return root / "weights", recipes


def test_both_recipes_write_weights_and_a_matching_manifest(foundations) -> None:
    out_dir, recipes = foundations
    manifest = verify_foundations(out_dir)
    assert set(manifest["files"]) == {SAM2_WEIGHTS, VLM_WEIGHTS}
    assert set(manifest["recipes"]) == set(recipes) == {"sam2", "vlm"}
    assert "track_JF" in manifest["recipes"]["sam2"]["metrics"]
    assert "qa_accuracy" in manifest["recipes"]["vlm"]["metrics"]
    assert manifest["recipes"]["vlm"]["phases"][-1]["stage"].endswith("VLMPretrainStage")


def test_the_recipe_reproduces_its_weights_bit_for_bit(
    foundations, tmp_path_factory: pytest.TempPathFactory, in_scratch_folder
) -> None:
    """Seeded data order and pinned CPU threads: a second run of the recipe writes the same files."""
    out_dir, _ = foundations
    root = tmp_path_factory.mktemp("pretrain_again")
    with in_scratch_folder(root) as store:
        pretrain_foundations([*TINY_RECIPES, store], root / "weights", EXPERIMENTS_DIR)
    first, again = verify_foundations(out_dir), verify_foundations(root / "weights")
    assert again["files"] == first["files"]
    assert {name: recipe["metrics"] for name, recipe in again["recipes"].items()} == {
        name: recipe["metrics"] for name, recipe in first["recipes"].items()
    }


def test_a_later_phase_starts_from_the_weights_the_phase_before_exported(foundations) -> None:
    _, recipes = foundations
    first, second = recipes["sam2"].phases
    assert first.config["model"]["sam2"]["checkpoint"] is None  # the first phase starts from scratch
    started_from = Path(second.config["model"]["sam2"]["checkpoint"])
    assert started_from.name == SAM2_WEIGHTS and started_from.is_file()
    assert first.config["data"]["num_frames"] == 1 and second.config["data"]["num_frames"] > 1


def test_exported_weights_load_into_the_tiny_model_classes(foundations, compose, tokenizer) -> None:
    out_dir, _ = foundations
    cfg = compose(
        f"model.sam2.checkpoint={out_dir / SAM2_WEIGHTS}", f"model.vlm.weights={out_dir / VLM_WEIGHTS}"
    )
    sam = instantiate(cfg.model.sam2)
    vlm = instantiate(cfg.model.vlm, tokenizer=tokenizer)
    for module, file_name in ((sam, SAM2_WEIGHTS), (vlm.model, VLM_WEIGHTS)):
        stored = load_file(out_dir / file_name)
        state = module.state_dict()
        assert stored and all(torch.equal(value, state[key]) for key, value in stored.items())
    fresh = instantiate(compose("model.vlm.weights=null").model.vlm, tokenizer=tokenizer)
    assert not torch.equal(vlm.model.lm_head.weight, fresh.model.lm_head.weight)


SHIPPED_LIMIT_BYTES = 20 * 2**20  # the budget for both files together


def test_shipped_foundations_match_their_manifest_and_are_what_the_default_model_loads(
    compose, tokenizer
) -> None:
    manifest = verify_foundations(SHIPPED_DIR)
    assert set(manifest["files"]) == {SAM2_WEIGHTS, VLM_WEIGHTS}
    assert sum(entry["bytes"] for entry in manifest["files"].values()) <= SHIPPED_LIMIT_BYTES
    for recipe in manifest["recipes"].values():
        assert recipe["metrics"] and recipe["phases"][-1]["metrics"] == recipe["metrics"]
    cfg = compose()
    assert Path(cfg.model.sam2.checkpoint) == SHIPPED_DIR / SAM2_WEIGHTS
    sam = instantiate(cfg.model.sam2)
    vlm = instantiate(cfg.model.vlm, tokenizer=tokenizer)
    for module, file_name in ((sam, SAM2_WEIGHTS), (vlm.model, VLM_WEIGHTS)):
        stored = load_file(SHIPPED_DIR / file_name)
        state = module.state_dict()
        assert set(stored) <= set(state)
        assert all(torch.equal(value, state[key]) for key, value in stored.items())
