"""The VLM: a transformers image-text model whose ``[SEG]`` hidden state prompts SAM-2.

Real runs load an InternVL-class checkpoint from a local ``save_pretrained`` folder; the embedded default
builds a tiny config of the same class (``InternVLForConditionalGeneration``) with random weights.
Either way :class:`SegTokenVLM` only reads the last-layer hidden state at the ``[SEG]`` token and the
language-model loss on the answer tokens, so any ``AutoModelForImageTextToText`` fits. The output head
(``lm_head``) runs only on the positions a loss or an answer reads: with a 150k-word vocabulary its logits
over a 5-frame conversation (~1,300 tokens) would be ~0.8 GB a clip in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TrainableTokensWrapper
from safetensors.torch import load_model
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import (
    AutoModelForImageTextToText,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.errors import WeightsFormatError
from lightning_desa2va.models.tokenizer import IMAGE_CONTEXT_TOKEN, SEG_TOKEN

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
LORA_PARAMETER_TAG = "lora_"
TRAINABLE_TOKENS_TAG = "trainable_tokens_delta"
"""peft's per-token deltas (``trainable_token_indices``): only those rows of the embedding and head train."""


@dataclass
class VLMOutput:
    """What the segmentation pipeline needs from one VLM forward pass."""

    seg_hidden: Tensor  # [B, d] last-layer hidden state at the first [SEG] token of each sequence
    lm_loss: Tensor | None  # next-token loss on the answer tokens, when labels were given
    answers: Tensor | None = (
        None  # [B, L - 1] the head's argmax where the next token is labelled (QA scoring)
    )


class SegTokenVLM(nn.Module):
    """Wraps a transformers image-text model and reads its ``[SEG]`` hidden state."""

    def __init__(self, model: PreTrainedModel, seg_token_id: int, image_size: int, image_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.seg_token_id = seg_token_id
        self.image_size = image_size
        self.image_tokens = image_tokens
        self.trainable_token_ids: list[int] = []
        """Tokens whose input embedding rows train under LoRA (new to a pretrained checkpoint, e.g. [SEG])."""

    @property
    def hidden_size(self) -> int:
        """Width d of the language model's hidden states."""
        return self.model.config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        """Size of the output vocabulary (the word heads of the pre-training objectives predict over it)."""
        return self.model.get_output_embeddings().out_features

    @property
    def language_model(self) -> nn.Module:
        """The language model inside the VLM: the part LoRA adapts."""
        return self.model.model.language_model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> VLMOutput:
        """Run the VLM; ``pixel_values`` are [B * T, 3, s, s] frames matching the image tokens.

        With ``labels``, the head runs on the labelled positions alone: the LM loss is the mean next-token
        cross-entropy over them (transformers' causal-LM loss), and ``answers`` its teacher-forced argmax
        there (what QA exact match reads, with no second pass and no vocabulary-wide logits elsewhere)."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values)
        if labels is None:
            return VLMOutput(seg_hidden=self._seg_states(input_ids, hidden), lm_loss=None)
        inputs, targets = self._labelled(hidden, labels)
        head = self.model.get_output_embeddings()(inputs)
        answers = torch.full_like(labels[:, 1:], IGNORE_INDEX)
        answers[labels[:, 1:] != IGNORE_INDEX] = head.argmax(-1)
        lm_loss = F.cross_entropy(head.float(), targets)
        return VLMOutput(seg_hidden=self._seg_states(input_ids, hidden), lm_loss=lm_loss, answers=answers)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Last-layer hidden states [B, L, d] of the base model (no output head)."""
        return self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **self.vision_inputs(input_ids, pixel_values),
        ).last_hidden_state

    def answer_tokens(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, labels: Tensor
    ) -> Tensor:
        """Teacher-forced argmax token [B, L - 1] at every position whose next token is labelled (the
        head's vocabulary-wide logits on those positions only); ``IGNORE_INDEX`` elsewhere."""
        answers = self(input_ids, attention_mask, pixel_values, labels).answers
        assert answers is not None  # labels were given
        return answers

    @staticmethod
    def _labelled(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states [N, d] of the positions whose next token is labelled, and those tokens [N]."""
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        return hidden[:, :-1][valid], targets[valid]

    def vision_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> dict[str, Tensor | None]:
        """The image arguments of the wrapped model's forward for frames [B * T, 3, s, s]: InternVL takes
        the frames as they are; a model with another image input (Qwen-VL's patches) converts them."""
        return {"pixel_values": pixel_values}

    def adapt(self, lora: LoraConfig) -> tuple[str, ...]:
        """LoRA on the language model and, for tokens new to the checkpoint (``[SEG]``), their rows of the
        input embedding and of the output head (peft's trainable tokens); the name parts of what trains.

        Where the checkpoint ties ``lm_head`` to the input embedding (transformers' default), the head's row
        is tied to the trained input row, so the ``[SEG]`` the model reads is the ``[SEG]`` it predicts;
        an untied head trains a row of its own."""
        tags = (LORA_PARAMETER_TAG,)
        head = self.model.get_output_embeddings()
        tied = head.weight is self.model.get_input_embeddings().weight
        if self.trainable_token_ids:
            lora = replace(lora, trainable_token_indices=self.trainable_token_ids)
            tags += (TRAINABLE_TOKENS_TAG,)
        inject_adapter_in_model(lora, self.language_model)
        if self.trainable_token_ids:
            embedding = self.model.get_input_embeddings()
            head = TrainableTokensWrapper(
                head,
                ADAPTER_NAME,
                token_indices=self.trainable_token_ids,
                tied_adapter=embedding.token_adapter if tied else None,
            )
            head.set_adapter(ADAPTER_NAME)
            self.model.set_output_embeddings(head)
            log.info(
                "rows of new tokens %s train in the input embedding and lm_head, %s",
                self.trainable_token_ids,
                "tied as the checkpoint ties them: one row serves both" if tied else "untied: a row each",
            )
        return tags

    def merge_adapters(self) -> None:
        """Fold LoRA and the trained token rows into the base weights and remove the adapters (for export):
        the plain transformers model that ``from_pretrained`` reads back."""
        done: list[str] = []
        for name, module in list(self.model.named_modules()):
            if any(name.startswith(f"{parent}.") for parent in done):
                continue
            if isinstance(module, TrainableTokensWrapper):
                module.token_adapter.merge()
                base = module.token_adapter.base_layer
            elif isinstance(module, BaseTunerLayer):
                module.merge()
                base = module.get_base_layer()
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, base)
            done.append(name)

    def _seg_states(self, input_ids: Tensor, hidden: Tensor) -> Tensor:
        is_seg = input_ids == self.seg_token_id
        missing = (~is_seg.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"sequences {missing} of the batch contain no {SEG_TOKEN} token")
        first_seg = is_seg.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_seg]


def build_tiny_internvl(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_positions: int,
    vision_hidden_size: int,
    vision_layers: int,
    vision_heads: int,
    vision_intermediate_size: int,
    image_size: int,
    patch_size: int,
    downsample_ratio: float,
    weights: str | None = None,
) -> SegTokenVLM:
    """An InternVL of the real class sized for CPU runs: random init, or ``weights`` (a safetensors file).

    The architecture always comes from these arguments, so a weights file that does not fit them is an
    error naming the file and the mismatching keys, never a silent partial load.
    """
    image_tokens = int((image_size // patch_size) ** 2 * downsample_ratio**2)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vision_hidden_size,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            intermediate_size=vision_intermediate_size,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
        image_seq_length=image_tokens,
        downsample_ratio=downsample_ratio,
    )
    model = InternVLForConditionalGeneration(config)
    if weights is not None:
        load_vlm_weights(model, Path(weights))
    return SegTokenVLM(model, tokenizer.convert_tokens_to_ids(SEG_TOKEN), image_size, image_tokens)


def load_vlm_weights(model: PreTrainedModel, path: Path) -> None:
    """Load a safetensors file into ``model`` strictly (tied embeddings are stored once)."""
    if not path.is_file():
        raise FileNotFoundError(f"VLM weights not found: {path}")
    try:
        load_model(model, path, strict=True)
    except RuntimeError as error:
        first_lines = " ".join(str(error).splitlines()[:3])
        raise ValueError(f"VLM weights {path} do not fit the configured model: {first_lines} ...") from error
    log.info("loaded VLM weights from %s", path)


def load_pretrained_vlm(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    train_tokens: list[str] | None = None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> SegTokenVLM:
    """Load a local InternVL-class ``save_pretrained`` folder (``local_files_only``); ``train_tokens`` (e.g.
    ``[SEG]``) are the tokens whose input embedding rows stage 2 trains, since a token new to the checkpoint
    has no pretrained embedding."""
    model = load_image_text_model(path, tokenizer, dtype, gradient_checkpointing)
    vision = model.config.vision_config
    image_size = vision.image_size[0] if isinstance(vision.image_size, list | tuple) else vision.image_size
    vlm = SegTokenVLM(
        model, tokenizer.convert_tokens_to_ids(SEG_TOKEN), image_size, model.config.image_seq_length
    )
    vlm.trainable_token_ids = tokenizer.convert_tokens_to_ids(list(train_tokens or []))
    return vlm


def load_image_text_model(
    path: str, tokenizer: PreTrainedTokenizerBase, dtype: str, gradient_checkpointing: bool = False
) -> PreTrainedModel:
    """``AutoModelForImageTextToText`` from a local folder, its embeddings grown for tokens the tokenizer
    added (transformers samples a new row from the old rows' mean and covariance); a folder that is not one
    is a one-line error naming it. ``gradient_checkpointing``: the layers recompute their activations in the
    backward pass instead of keeping them (transformers' own, non-reentrant, so a frozen base with LoRA
    still gets its gradients)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model folder (config.json) at {folder}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise WeightsFormatError(f"{folder} is no loadable image-text model folder: {first_line}") from error
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    log.info("loaded VLM %s from %s", type(model).__name__, folder)
    return model
