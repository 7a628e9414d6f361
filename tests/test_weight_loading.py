"""Real-weight loading, tested on small checkpoints saved here in the real formats.

SAM-2: official ``.pt`` files (``{"model": state_dict}``) and safetensors; the VLM: a transformers
``save_pretrained`` folder with its tokenizer, and a safetensors file for the tiny default; and the
foundations manifest that guards shipped files.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_desa2va.foundations import (
    FoundationMismatchError,
    Phase,
    Recipe,
    export_weights,
    verify_foundations,
    write_manifest,
)
from lightning_desa2va.models.sam2 import build_sam2
from lightning_desa2va.models.tokenizer import SEG_TOKEN, load_tokenizer
from lightning_desa2va.models.vlm import build_tiny_internvl, load_pretrained_vlm


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return module


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    theirs = second.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in first.state_dict().items())


def test_sam2_loads_an_official_pt_checkpoint(compose, tmp_path) -> None:
    sam_cfg = compose().model.sam2
    source = _perturbed(instantiate(sam_cfg))
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_sam2(sam_cfg.config_name, list(sam_cfg.overrides), str(path))
    assert _same_weights(source, loaded)
    assert not _same_weights(source, instantiate(sam_cfg))


def test_sam2_checkpoint_errors_name_the_file(compose, tmp_path) -> None:
    sam_cfg = compose().model.sam2
    state = instantiate(sam_cfg).state_dict()
    state.pop(next(iter(state)))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": state}, wrong)
    with pytest.raises(ValueError, match="wrong.pt"):
        build_sam2(sam_cfg.config_name, list(sam_cfg.overrides), str(wrong))
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_sam2(sam_cfg.config_name, list(sam_cfg.overrides), str(tmp_path / "absent.pt"))


def test_sam2_round_trips_through_safetensors(compose, tmp_path) -> None:
    sam_cfg = compose().model.sam2
    source = _perturbed(instantiate(sam_cfg))
    path = export_weights(source, tmp_path / "sam2.safetensors")
    assert _same_weights(source, build_sam2(sam_cfg.config_name, list(sam_cfg.overrides), str(path)))


def test_vlm_loads_a_save_pretrained_folder_with_its_tokenizer(make_model, tokenizer, tmp_path) -> None:
    _, model = make_model()
    _perturbed(model.vlm.model).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer = load_tokenizer(str(tmp_path))
    loaded = load_pretrained_vlm(str(tmp_path), loaded_tokenizer)
    assert loaded_tokenizer.convert_tokens_to_ids(SEG_TOKEN) == loaded.seg_token_id == model.vlm.seg_token_id
    assert (loaded.image_size, loaded.image_tokens, loaded.hidden_size) == (
        model.vlm.image_size,
        model.vlm.image_tokens,
        model.vlm.hidden_size,
    )
    assert _same_weights(model.vlm.model, loaded.model)


def test_tiny_vlm_loads_safetensors_and_rejects_a_misfit(compose, tokenizer, make_model, tmp_path) -> None:
    _, model = make_model()
    path = export_weights(_perturbed(model.vlm.model), tmp_path / "vlm.safetensors")
    vlm_cfg = compose().model.vlm
    loaded = instantiate(vlm_cfg, tokenizer=tokenizer, weights=str(path))
    assert _same_weights(model.vlm.model, loaded.model)
    wider = OmegaConf.to_container(vlm_cfg) | {"hidden_size": 2 * vlm_cfg.hidden_size, "weights": str(path)}
    with pytest.raises(ValueError, match="vlm.safetensors"):
        build_tiny_internvl(tokenizer=tokenizer, **{k: v for k, v in wider.items() if k != "_target_"})


def test_manifest_guards_the_weights_files(make_model, tmp_path) -> None:
    _, model = make_model()
    weights = {
        "sam2": export_weights(model.sam, tmp_path / "sam2.safetensors"),
        "vlm": export_weights(model.vlm.model, tmp_path / "vlm.safetensors"),
    }
    phase = Phase(stage="sam2_pretrain", overrides=[], config={"seed": 0}, seed=0, metrics={"point_iou": 0.5})
    recipe = Recipe(phases=[phase])
    write_manifest(tmp_path, {"sam2": recipe, "vlm": recipe}, weights)
    manifest = verify_foundations(tmp_path)
    assert set(manifest["files"]) == {"sam2.safetensors", "vlm.safetensors"}
    assert manifest["recipes"]["sam2"]["metrics"] == {"point_iou": 0.5}

    data = bytearray(weights["vlm"].read_bytes())
    data[-1] ^= 0xFF
    weights["vlm"].write_bytes(bytes(data))
    with pytest.raises(FoundationMismatchError, match="vlm.safetensors"):
        verify_foundations(tmp_path)
    weights["sam2"].unlink()
    with pytest.raises(FoundationMismatchError, match="sam2.safetensors"):
        verify_foundations(tmp_path)
