"""Config composition: experiments, component swaps, key/type validation and saving."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_desa2va.config import ConfigError, compose_config, save_config
from lightning_desa2va.models.decoupler import (
    LinearDecoupler,
    LinearOrthoDecoupler,
    MLPDecoupler,
    NoDecoupler,
    OrthogonalDecoupler,
)
from lightning_desa2va.models.fusion import (
    ConfidenceFusion,
    DynamicFusion,
    LearnedFusion,
    MaxFusion,
    MeanFusion,
    TextFusion,
    VisualFusion,
)
from lightning_desa2va.models.motion_cue import NoMotionCue, NormalFlowCue


def test_default_compose_has_every_component_and_the_stage_1_schedule(compose) -> None:
    cfg = compose()
    components = ("decoupler", "text_prompt", "visual_prompt", "fusion", "motion_cue", "loss")
    for group in ("model", *components, "data", "stage"):
        assert group in cfg, group
    assert cfg.decoupler._target_.endswith("LinearOrthoDecoupler")
    assert cfg.loss.w_orth == 0.1
    assert cfg.fusion._target_.endswith("DynamicFusion")
    assert cfg.stage._target_.endswith("TextPretrainStage")
    assert cfg.logger.run_name == "text_pretrain"  # the stage's _global_ package reaches other groups


def test_stage_override_switches_the_lightning_module(compose) -> None:
    cfg = compose("stage=decoupled_finetune")
    assert cfg.stage._target_.endswith("DecoupledFinetuneStage")
    assert cfg.logger.run_name == "decoupled_finetune"
    assert "lora" in cfg.stage


def flat_values(cfg) -> dict[str, object]:
    """Every leaf of a resolved config by its dotted key, the composition record (``run``) left out."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("run")
    return {key: value for key, value in pd.json_normalize(container, sep=".").iloc[0].to_dict().items()}


def test_desa2va_tiny_experiment_is_the_embedded_default(compose) -> None:
    assert flat_values(compose("experiment=desa2va_tiny")) == flat_values(compose())
    assert compose("experiment=desa2va_tiny").run.experiment == "desa2va_tiny"


@pytest.mark.parametrize("stage", ["text_pretrain", "decoupled_finetune"])
def test_sa2va_baseline_differs_from_the_default_only_in_desa2va_s_components_and_budget(
    compose, stage
) -> None:
    default = flat_values(compose("experiment=desa2va_tiny", f"stage={stage}"))
    baseline = flat_values(compose("experiment=sa2va_baseline", f"stage={stage}"))
    differing = {key for key in default.keys() | baseline.keys() if default.get(key) != baseline.get(key)}
    groups = {key.split(".")[0] for key in differing if key.split(".")[0] in ("decoupler", "fusion")}
    others = {key for key in differing if key.split(".")[0] not in groups}
    assert groups == {"decoupler", "fusion"}
    # no text pre-training stage, no text / visual / orthogonality supervision, and stage 2 gets both
    # stages' steps; everything else (the motion prompt included) is the same
    assert others == {"pipeline.stages", "loss.w_t", "loss.w_v", "loss.w_orth", "trainer.max_steps"}
    assert baseline["pipeline.stages"] == ["decoupled_finetune"]
    text_steps = compose("stage=text_pretrain").trainer.max_steps
    finetune_steps = compose("stage=decoupled_finetune").trainer.max_steps
    assert baseline["trainer.max_steps"] == text_steps + finetune_steps
    assert baseline["motion_prompt._target_"].endswith("FlowMatchPrompt")
    assert baseline["loss.w_stated_motion"] == default["loss.w_stated_motion"] == 1.0


def test_motion_prompt_none_also_switches_off_its_stated_motion_term(compose) -> None:
    cfg = compose("motion_prompt=none")
    assert cfg.motion_prompt._target_.endswith("NoMotionPrompt")
    assert cfg.loss.w_stated_motion == 0.0


def test_command_line_override_beats_the_experiment(compose) -> None:
    cfg = compose("experiment=sa2va_baseline", "loss.w_t=0.3")
    assert cfg.loss.w_t == 0.3
    assert cfg.decoupler._target_.endswith("NoDecoupler")


def test_unknown_experiment_fails_naming_it_and_the_folder_searched(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"no_such_experiment.yaml in {tmp_path}"):
        compose_config(["experiment=no_such_experiment"], experiments_dir=tmp_path)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", NoDecoupler),
        ("linear", LinearDecoupler),
        ("linear_ortho", LinearOrthoDecoupler),
        ("orthogonal", OrthogonalDecoupler),
        ("mlp", MLPDecoupler),
    ],
)
def test_decoupler_override_swaps_the_built_class(make_model, choice, expected) -> None:
    _, model = make_model(f"decoupler={choice}")
    assert type(model.decoupler) is expected
    # widths come from the built foundations: VLM hidden size in, SAM-2 prompt width out
    embeddings = model.decoupler(torch.zeros(3, model.vlm.hidden_size))
    assert embeddings.text.shape == embeddings.visual.shape == (3, model.sam.prompt_dim)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("text", TextFusion),
        ("visual", VisualFusion),
        ("mean", MeanFusion),
        ("learned", LearnedFusion),
        ("dynamic", DynamicFusion),
        ("confidence", ConfidenceFusion),
        ("max", MaxFusion),
    ],
)
def test_fusion_override_swaps_the_built_class(compose, choice, expected) -> None:
    fusion = instantiate(compose(f"fusion={choice}").fusion)(embed_dim=8)
    assert type(fusion) is expected


@pytest.mark.parametrize(("choice", "expected"), [("none", NoMotionCue), ("normal_flow", NormalFlowCue)])
def test_motion_cue_override_swaps_the_built_class(make_model, choice, expected) -> None:
    _, model = make_model(f"motion_cue={choice}")
    assert type(model.motion_cue) is expected


def test_component_hyperparameters_reach_the_built_modules(make_model) -> None:
    _, model = make_model("text_prompt.num_points=3", "fusion.hidden_channels=5")
    assert model.text_prompt.num_points == 3
    assert model.text_prompt.to_coords.out_features == 6
    assert model.fusion.mask_gate[0].out_channels == 5


def test_override_of_a_missing_key_fails_in_hydra_naming_it(compose) -> None:
    with pytest.raises(HydraException, match="w_foo"):
        compose("loss.w_foo=1")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+loss.w_foo=1", "loss.w_foo"),
        ("+trainr.max_steps=3", "trainr"),
        ("+loss.mask.w_bcee=1", "loss.mask.w_bcee"),
        ("+decoupler.hidden=4", "decoupler.hidden"),
    ],
)
def test_added_unknown_key_fails_naming_it(compose, override, key) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        compose(override)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.w_t=abc", "loss.w_t"),
        ("seed=abc", "seed"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("loss.mask.w_dice=[1,2]", "loss.mask.w_dice"),
    ],
)
def test_wrong_type_fails_naming_the_key(compose, override, key) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        compose(override)


def test_values_of_the_right_type_pass_validation(compose) -> None:
    cfg = compose("loss.w_t=1", "data.batch_size=4", "seed=7")  # an int is a valid float
    assert (cfg.loss.w_t, cfg.data.batch_size, cfg.seed) == (1, 4, 7)


def test_experiment_from_a_custom_directory_is_applied(tmp_path: Path) -> None:
    (tmp_path / "tmp_custom_experiment.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /decoupler: none\nloss:\n  w_t: 0.25\n"
    )
    cfg = compose_config(["experiment=tmp_custom_experiment"], experiments_dir=tmp_path)
    assert cfg.decoupler._target_.endswith("NoDecoupler")
    assert cfg.loss.w_t == 0.25
    assert cfg.fusion._target_.endswith("DynamicFusion")  # the rest stays default


def test_save_config_round_trips_the_resolved_config(compose, tmp_path: Path) -> None:
    cfg = compose("experiment=sa2va_baseline", "stage=decoupled_finetune", f"paths.output_dir={tmp_path}")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    loaded = OmegaConf.load(path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert OmegaConf.to_container(loaded) == resolved
    assert loaded.trainer.default_root_dir == str(tmp_path)  # interpolations are written resolved
