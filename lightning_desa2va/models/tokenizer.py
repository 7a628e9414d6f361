"""Tokenizers with the special tokens the pipeline needs: ``[SEG]`` and InternVL's image tokens.

The embedded default builds a real word-level tokenizer offline with the ``tokenizers`` library from the
synthetic benchmark's vocabulary and the prompt templates; real runs load a checkpoint's tokenizer from a
local folder. Both come back as transformers tokenizers, with the special tokens added.
"""

from __future__ import annotations

from pathlib import Path
from string import Formatter

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_desa2va.data.synthetic import SyntheticConfig
from lightning_desa2va.data.synthetic_words import vocabulary
from lightning_desa2va.errors import WeightsFormatError

SEG_TOKEN = "[SEG]"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
USER_ROLE = "user"
ASSISTANT_ROLE = "assistant"
SPECIAL_TOKENS = (
    PAD_TOKEN,
    UNK_TOKEN,
    SEG_TOKEN,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    TURN_START_TOKEN,
    TURN_END_TOKEN,
)


def build_word_level_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` (lower-cased) plus the specials."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    normalizer = normalizers.Lowercase()
    words: set[str] = {USER_ROLE, ASSISTANT_ROLE}
    for text in texts:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        words.update(piece for piece, _ in pieces)
    words.difference_update(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    return tokenizer


def build_synthetic_tokenizer(templates: list[str]) -> PreTrainedTokenizerFast:
    """The embedded default's tokenizer: the synthetic benchmark's words and the prompt templates."""
    literal_parts = [part for template in templates for part, *_ in Formatter().parse(template)]
    return build_word_level_tokenizer([*vocabulary(SyntheticConfig()), *literal_parts])


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a checkpoint's tokenizer from a local folder and add the pipeline's special tokens."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or PAD_TOKEN
    return tokenizer


def load_pretrained_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A real checkpoint's tokenizer with its chat template, from its processor in a local folder, plus
    ``[SEG]`` as a new special token (the image and turn tokens are the checkpoint's own).

    The processor is loaded because an ``-hf`` folder may keep the chat template with it alone.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"VLM folder not found: {folder}")
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise WeightsFormatError(f"no transformers processor/tokenizer in {folder}: {first_line}") from error
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise WeightsFormatError(f"the processor in {folder} has no tokenizer (an image-text model expected)")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = getattr(processor, "chat_template", None)
    if tokenizer.chat_template is None:
        raise WeightsFormatError(
            f"no chat template in {folder} (chat_template.jinja or the tokenizer config)"
        )
    tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or PAD_TOKEN
    return tokenizer
