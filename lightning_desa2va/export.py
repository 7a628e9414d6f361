"""``desa2va export``: a fine-tuned stage-2 checkpoint as a self-contained Hugging Face folder.

The folder is the VLM with LoRA and the trained ``[SEG]`` rows merged into its weights, saved as
transformers saves it (``save_pretrained``: config, safetensors, tokenizer with ``[SEG]``, processor), so
``from_pretrained`` reads it; beside it ``sam2.safetensors`` (the base SAM-2 the model was built from, which
Sa2VA-i also tracks with), ``desa2va.safetensors`` (the DeSa2VA modules and the SAM-2 weights the run
trained, e.g. its mask decoder), ``desa2va.yaml`` (the resolved config), ``desa2va.json`` (the overrides
that rebuild the model from the folder, the scores, the sizes) and a model card (``README.md``).
``desa2va predict`` and ``desa2va eval`` take the folder where they take a checkpoint. The tiny default's
VLM has no processor, so it is saved as the foundations are (``vlm.safetensors``, ``model.vlm.weights``).

Every file is read back and its tensors counted against the model: a tensor the files lack is an error
naming it, and the printed sizes show the export holds as many parameters as the base model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerBase

from lightning_desa2va.build import build_components, run_overrides
from lightning_desa2va.config import save_config
from lightning_desa2va.errors import CheckpointError
from lightning_desa2va.foundations import export_weights
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.runs import read_record, run_dir_of_checkpoint
from lightning_desa2va.stages.checkpoints import (
    EXPORT_MANIFEST,
    EXPORT_MODULES,
    FOUNDATIONS,
    StageWeights,
    apply_model_weights,
    model_overrides,
    read_model_weights,
    scores_of,
)

log = logging.getLogger(__name__)

SAM2_FILE = "sam2.safetensors"
TINY_VLM_FILE = "vlm.safetensors"
CONFIG_FILE = "desa2va.yaml"
CARD_FILE = "README.md"
TINY_MODEL = "tiny"
SAFETENSORS_GLOB = "*.safetensors"
ADAPTER_TAGS = ("lora_", "trainable_tokens")
"""Parameter-name parts of adapters, which merging folds into the base weights."""
REPLACED = {"model", "model.folder", "model.vlm.weights", "model.sam2.checkpoint"}
"""Overrides of the run that the export's own replace."""
EXPORT_STAGE = ["stage=decoupled_finetune", "stage.lora=null", "stage.init_from=null"]
"""An export is a stage-2 model whose VLM has LoRA merged: no adapter to add, nothing to initialise from."""
CARD_TAGS = ["desa2va", "sa2va", "referring-video-object-segmentation", "sam2"]
VLM_PART, SAM2_PART, MODULES_PART = "VLM", "SAM-2", "DeSa2VA modules + trained SAM-2"


class ExportError(CheckpointError):
    """An export that would not hold every weight of the model."""


@dataclass
class PartSize:
    """One part of the export: tensor elements in its files and in the base model, and bytes on disk."""

    part: str
    exported: int
    base: int
    bytes: int


@dataclass
class Export:
    """What ``export`` wrote: the folder, each part's size and the overrides that read it back."""

    out: Path
    sizes: list[PartSize]
    overrides: list[str]


def export(cfg: DictConfig, checkpoint: Path, out: Path) -> Export:
    """Write the stage-2 model of ``checkpoint`` (built by ``cfg``, on the CPU in fp32) into ``out``."""
    weights = read_model_weights(checkpoint)
    parts = build_components(cfg)
    model = parts.model
    apply_model_weights(model, weights, complete=True)
    trained = trained_weights(model, weights)
    base = base_sizes(model, trained)
    model.vlm.merge_adapters()
    out.mkdir(parents=True, exist_ok=True)
    kind = cfg.run.choices.model
    base_sam2 = instantiate(cfg.model.sam2)
    save_file(trained, str(out / EXPORT_MODULES))
    files = {
        VLM_PART: save_vlm(cfg, parts.tokenizer, model, out),
        SAM2_PART: [export_weights(base_sam2, out / SAM2_FILE)],
        MODULES_PART: [out / EXPORT_MODULES],
    }
    states = {VLM_PART: model.vlm.model.state_dict(), SAM2_PART: base_sam2.state_dict()}
    states[MODULES_PART] = trained
    loaded = {part: read_back(paths) for part, paths in files.items()}
    if kind != TINY_MODEL:  # transformers' own format (its own key names): read back as transformers reads it
        reloaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
        loaded[VLM_PART] = reloaded.state_dict()
    sizes = [check_saved(part, states[part], loaded[part], files[part], base[part]) for part in files]
    overrides = read_back_overrides(cfg, out, kind)
    save_config(cfg, out / CONFIG_FILE)
    scores = run_scores(Path(checkpoint)) or weights.record.scores
    manifest = {
        "overrides": overrides,
        "checkpoint": str(Path(checkpoint).resolve()),
        "scores": scores,
        "sizes": [asdict(size) for size in sizes],
    }
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(cfg, weights.path, out, overrides, sizes, scores)
    log.info("exported %s to %s", checkpoint, out)
    return Export(out, sizes, overrides)


def base_sizes(model: DeSa2VA, trained: Mapping[str, Tensor]) -> dict[str, int]:
    """Tensor elements each part holds in the model without its adapters (what merging leaves; a tensor
    shared by several names counted once): the VLM, SAM-2, and the DeSa2VA modules with the SAM-2 weights
    the run trained."""

    def without_adapters(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
        kept = {
            value.data_ptr(): value.numel()
            for name, value in module.state_dict().items()
            if not any(tag in name for tag in ADAPTER_TAGS) and not name.startswith(skip)
        }
        return sum(kept.values())

    trained_sam2 = sum(value.numel() for key, value in trained.items() if key.startswith(FOUNDATIONS))
    return {
        VLM_PART: without_adapters(model.vlm.model),
        SAM2_PART: without_adapters(model.sam),
        MODULES_PART: without_adapters(model, skip=FOUNDATIONS) + trained_sam2,
    }


def trained_weights(model: DeSa2VA, weights: StageWeights) -> dict[str, Tensor]:
    """The model's weights outside the foundations, and those of SAM-2 the checkpoint holds (the run trained
    or initialised them), as contiguous tensors."""
    return {
        key: value.contiguous()
        for key, value in model.state_dict().items()
        if not key.startswith(FOUNDATIONS) or (key.startswith("sam.") and key in weights.tensors)
    }


def save_vlm(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, model: DeSa2VA, out: Path) -> list[Path]:
    """The merged VLM as transformers saves it, with its processor and the tokenizer that has ``[SEG]``; the
    tiny default's as the foundations are. The weight files written."""
    if cfg.run.choices.model == TINY_MODEL:
        return [export_weights(model.vlm.model, out / TINY_VLM_FILE)]
    before = set(out.glob(SAFETENSORS_GLOB))
    model.vlm.model.save_pretrained(out)
    AutoProcessor.from_pretrained(cfg.model.folder, local_files_only=True).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sorted(set(out.glob(SAFETENSORS_GLOB)) - before)


def check_saved(
    part: str, state: Mapping[str, Tensor], loaded: Mapping[str, Tensor], files: list[Path], base: int
) -> PartSize:
    """Every tensor of ``state`` is in ``loaded`` (what the written ``files`` give back), unchanged; a tensor
    stored once for several names (tied embeddings) counts for all of them. The part's size."""
    shared: dict[int, list[str]] = {}
    for key, value in state.items():
        shared.setdefault(value.data_ptr(), []).append(key)

    def unchanged(key: str, value: Tensor) -> bool:
        names = [key, *shared[value.data_ptr()]]
        back = next((loaded[name] for name in names if name in loaded), None)
        return back is not None and back.shape == value.shape and torch.equal(back.to(value), value)

    changed = [key for key, value in state.items() if not unchanged(key, value)]
    if changed:
        raise ExportError(
            f"the {part} read back from {files[0].parent} lacks or changes {len(changed)} of its tensors, "
            f"first {changed[0]}"
        )
    exported = sum(value.numel() for value in {v.data_ptr(): v for v in loaded.values()}.values())
    return PartSize(part, exported, base, sum(path.stat().st_size for path in files))


def read_back(files: list[Path]) -> dict[str, Tensor]:
    """The tensors of safetensors files, by name."""
    tensors: dict[str, Tensor] = {}
    for path in files:
        tensors |= load_file(path)
    return tensors


def read_back_overrides(cfg: DictConfig, out: Path, kind: str) -> list[str]:
    """The run's overrides that shape its model, then those that build it from ``out`` instead."""
    kept = [
        o for o in model_overrides(run_overrides(cfg)) if o.lstrip("+~").partition("=")[0] not in REPLACED
    ]
    folder = out.resolve()
    vlm = f"model.vlm.weights={folder / TINY_VLM_FILE}" if kind == TINY_MODEL else f"model.folder={folder}"
    return [f"model={kind}", *kept, vlm, f"model.sam2.checkpoint={folder / SAM2_FILE}", *EXPORT_STAGE]


def run_scores(checkpoint: Path) -> dict[str, float]:
    """The final val and test figures of the run a checkpoint belongs to, from its MLflow run (none when it is
    not in a run folder or the run logged nowhere)."""
    run_dir = run_dir_of_checkpoint(checkpoint)
    record = read_record(run_dir) if run_dir else None
    if record is None or not record.mlflow_run_id or not record.tracking_uri:
        return {}
    metrics = MlflowClient(record.tracking_uri).get_run(record.mlflow_run_id).data.metrics
    return scores_of(metrics)


def write_card(
    cfg: DictConfig,
    checkpoint: Path,
    out: Path,
    overrides: list[str],
    sizes: list[PartSize],
    scores: Mapping[str, float],
) -> Path:
    """A Hugging Face model card: what the folder holds, how to run it, the scores it reached, its config."""
    base_model = Path(str(cfg.model.folder)).name if "folder" in cfg.model else None
    data = ModelCardData(library_name="transformers", tags=CARD_TAGS, base_model=base_model)
    table = "\n".join(f"| `{name}` | {value:.4f} |" for name, value in sorted(scores.items()))
    size_rows = "\n".join(f"| {s.part} | {s.exported:,} | {s.base:,} | {s.bytes:,} |" for s in sizes)
    body = f"""# DeSa2VA ({cfg.run.experiment})

A DeSa2VA referring video segmentation model exported by `desa2va export` from `{checkpoint}`:
the VLM with LoRA and the `[SEG]` rows merged (transformers format), `sam2.safetensors` (the base SAM-2),
`desa2va.safetensors` (the DeSa2VA modules and the trained SAM-2 weights), `desa2va.yaml` (the config).

```bash
desa2va predict --ckpt {out} --video clip.mp4 --expression "the cat jumping"
desa2va eval {out} --split val paths.data_dir=DATA
```

Overrides that rebuild the model from this folder (applied by the commands above):
`{" ".join(overrides)}`

## Scores the run reached

| metric | value |
|---|---:|
{table or "| (none logged) | |"}

## Sizes

| part | parameters exported | parameters in the base model | bytes |
|---|---:|---:|---:|
{size_rows}

## Config

```yaml
{OmegaConf.to_yaml(cfg, resolve=True)}```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = out / CARD_FILE
    card.save(path)
    return path
