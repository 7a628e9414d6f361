"""Tiny checkpoints written in exactly the formats real weights ship in, for offline real-weight tests.

- :func:`write_internvl_hf`: a transformers ``-hf`` InternVL folder (``save_pretrained`` of the model, its
  processor and tokenizer, a ChatML chat template), as ``OpenGVLab/InternVL3-1B-hf`` ships; its tokenizer
  lacks ``[SEG]``, as a real one does.
- :func:`write_sam2_pt`: an official-format SAM-2 checkpoint, ``torch.save({"model": state_dict})``.
- :func:`write_real_weights`: both under one ``weights_dir`` and the overrides that point a run at them.

The tokenizer is a ``tokenizers`` word-level model over the synthetic benchmark's words, so everything is
built offline; sizes are tiny so a test trains on CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from lightning_desa2va.data.synthetic import SyntheticConfig
from lightning_desa2va.data.synthetic_words import vocabulary
from lightning_desa2va.models.sam2 import build_sam2

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    *IMAGE_TOKENS.values(),
    "<video>",
    *QWEN_TOKENS,
    "<|im_start|>",
    "<|im_end|>",
]
EXTRA_WORDS = ["please", "segment", "sure", "user", "assistant", "system", ",", ".", "?"]
VLM_FOLDER = "InternVL3-tiny-hf"
QWEN_FOLDER = "Qwen2.5-VL-tiny"
QWEN_IMAGE_SIZE = 56  # 4 x 4 patches of 14 pixels, merged 2 x 2: 4 image tokens a frame
SAM2_FILE = "sam2.1_hiera_tiny_test.pt"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with InternVL's and Qwen-VL's image tokens and ChatML's turn tokens, and no
    ``[SEG]``."""
    pre_tokenizer, normalizer = pre_tokenizers.Whitespace(), normalizers.Lowercase()
    words = set(EXTRA_WORDS)
    for text in vocabulary(SyntheticConfig()):
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {
        token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={**IMAGE_TOKENS, "video_token": "<video>"},
    )
    tokenizer.add_tokens(SPECIAL_TOKENS[2:], special_tokens=True)  # never split, as in the real tokenizer
    return tokenizer


def tiny_language_model(vocab_size: int, hidden_size: int) -> dict[str, int]:
    """The text-model fields both tiny VLMs share (Qwen2 and Qwen2.5-VL's language model)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 512,
    }


def write_internvl_hf(
    folder: Path,
    hidden_size: int = 32,
    image_size: int = 64,
    patch_size: int = 8,
    vision: dict | None = None,
    text: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random ``InternVLForConditionalGeneration`` with its processor, saved as ``-hf`` folders are: tiny,
    or shaped by ``vision`` / ``text`` (``InternVLVisionConfig`` / ``Qwen2Config`` fields, e.g. a real
    model's), saved in ``dtype``."""
    tokenizer = tiny_tokenizer()
    downsample_ratio = 0.5
    image_tokens = int((image_size // patch_size) ** 2 * downsample_ratio**2)
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=image_tokens,
        chat_template=CHATML_TEMPLATE,
    )
    vision_config = {
        "hidden_size": hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden_size,
        **(vision or {}),
    }
    text_config = {**tiny_language_model(len(tokenizer), hidden_size), **(text or {})}
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision_config, image_size=image_size, patch_size=patch_size),
        text_config=Qwen2Config(**text_config, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
        image_seq_length=image_tokens,
        downsample_ratio=downsample_ratio,
    )
    InternVLForConditionalGeneration(config).to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_qwen2_5_vl(folder: Path, hidden_size: int = 32) -> Path:
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` with its processor, as Qwen's folders are."""
    tokenizer = tiny_tokenizer()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=QWEN_IMAGE_SIZE**2, max_pixels=QWEN_IMAGE_SIZE**2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHATML_TEMPLATE,
    )
    head_dim = hidden_size // 2
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 1,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        text_config={
            **tiny_language_model(len(tokenizer), hidden_size),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, head_dim // 2 - 5],
            },
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        **{
            f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
            for name, token in zip(("vision_start", "image", "vision_end", "video"), QWEN_TOKENS, strict=True)
        },
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_sam2_pt(path: Path, config_name: str, overrides: list[str]) -> Path:
    """An official-format SAM-2 checkpoint of the ``sam2`` config ``config_name`` with ``overrides``."""
    model = build_sam2(config_name, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


@dataclass
class RealWeights:
    """A weights folder laid out as docs/real_weights.md shows, and the overrides that read it."""

    weights_dir: Path
    vlm_folder: Path
    qwen_folder: Path
    sam2_checkpoint: Path
    overrides: list[str]
    """``model=internvl_hf`` on the InternVL folder."""
    qwen_overrides: list[str]
    """``model=qwen2_5_vl`` on the Qwen2.5-VL folder."""


def write_real_weights(weights_dir: Path, sam2_config_name: str, sam2_overrides: list[str]) -> RealWeights:
    """The tiny InternVL-hf and Qwen2.5-VL folders and SAM-2 ``.pt`` under ``weights_dir``, and the
    overrides that select each model on them (SAM-2 sized by ``sam2_overrides``, e.g. the tiny default's)."""
    vlm_folder = write_internvl_hf(weights_dir / VLM_FOLDER)
    qwen_folder = write_qwen2_5_vl(weights_dir / QWEN_FOLDER)
    checkpoint = write_sam2_pt(weights_dir / SAM2_FILE, sam2_config_name, sam2_overrides)
    quoted = ",".join(f"'{override}'" for override in sam2_overrides)
    sam2 = [
        f"paths.weights_dir={weights_dir}",
        f"model.sam2.config_name={sam2_config_name}",
        f"model.sam2.checkpoint={checkpoint}",
        f"model.sam2.overrides=[{quoted}]",
    ]
    return RealWeights(
        weights_dir,
        vlm_folder,
        qwen_folder,
        checkpoint,
        overrides=["model=internvl_hf", f"model.folder={vlm_folder}", *sam2],
        qwen_overrides=[
            "model=qwen2_5_vl",
            f"model.folder={qwen_folder}",
            f"model.vlm.image_size={QWEN_IMAGE_SIZE}",
            *sam2,
        ],
    )
