"""VLM pre-training: captions from objects, caption + QA chats, the answer scores, the referent objective
and the stage itself."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lightning_desa2va.data.captions import CaptionTemplates, clip_caption
from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
from lightning_desa2va.data.clips import ClipEncoder, collate_clips
from lightning_desa2va.data.schema import ObjectTrack, QAPair
from lightning_desa2va.data.synthetic import SyntheticConfig, generate_video
from lightning_desa2va.errors import NonFiniteLossError
from lightning_desa2va.models.tokenizer import IMAGE_CONTEXT_TOKEN, TURN_END_TOKEN, UNK_TOKEN
from lightning_desa2va.stages.answers import score_answers
from lightning_desa2va.stages.referent import referent_hits, referent_loss, referent_rows
from lightning_desa2va.stages.vlm_pretrain import (
    METRIC_NAMES,
    NoAnswersError,
    expression_separation,
    question_kind,
)

STEPS = 8
LEARNING_RATE = 3e-3  # fixed here, so the test does not depend on the tuned default
IMAGE_TOKENS = 3
QA = [QAPair("What colour is the circle?", "red"), QAPair("Which way is the red circle moving?", "up")]
# small clips (64 px, 4 frames) keep the encoder and the model cheap
CLIP_CONFIG = SyntheticConfig(image_size=64, num_frames=4, radius_range=(5, 7))
OBJECTS = [
    ObjectTrack(id=1, colour="red", shape="circle", motion="up-left", speed="fast"),
    ObjectTrack(id=2, colour="blue", shape="square", motion="still", speed="none"),
    ObjectTrack(id=3, colour="blue", shape="square", motion="left", speed="slow"),
]


def test_caption_names_every_object_in_canonical_order() -> None:
    caption = clip_caption(OBJECTS, CaptionTemplates())
    assert caption == (
        "the blue square moving left, the blue square that stays still, the red circle moving up and left."
    )
    # the order is a function of the objects, not of their ids
    assert clip_caption(OBJECTS[::-1], CaptionTemplates()) == caption


def test_caption_of_a_generated_clip_matches_its_objects_and_the_tokenizer(tokenizer) -> None:
    video = generate_video(CLIP_CONFIG, seed=3, video_id="clip")
    caption = clip_caption(video.objects, ChatTemplates())
    assert caption is not None and caption.count(", ") == len(video.objects) - 1
    for track in video.objects:
        assert f"{track.colour} {track.shape}" in caption
    ids = tokenizer(f"{ChatTemplates().caption_question} {caption}", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(UNK_TOKEN) not in ids, tokenizer.convert_ids_to_tokens(ids)


def test_objects_without_attributes_get_no_caption() -> None:
    unknown = [*OBJECTS, ObjectTrack(id=4)]  # real datasets: attribute words are ""
    assert clip_caption(unknown, CaptionTemplates()) is None
    assert clip_caption([], CaptionTemplates()) is None


def labelled_text(tokenizer, chat) -> str:
    return tokenizer.decode(chat.input_ids[chat.labels != IGNORE_INDEX])


def test_caption_qa_labels_the_answers_only(tokenizer) -> None:
    encoder = ChatEncoder(tokenizer, ChatTemplates(), IMAGE_TOKENS)
    caption = clip_caption(OBJECTS, CaptionTemplates())
    chat = encoder.caption_qa(caption, num_frames=2, qa=QA)
    answers = [caption, *(pair.answer for pair in QA)]
    expected = tokenizer(" ".join(f"{answer} {TURN_END_TOKEN}" for answer in answers))["input_ids"]
    assert labelled_text(tokenizer, chat).split() == tokenizer.decode(expected).split()
    assert torch.equal(chat.labels[chat.labels != IGNORE_INDEX], chat.input_ids[chat.labels != IGNORE_INDEX])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    assert int((chat.input_ids == image_id).sum()) == 2 * IMAGE_TOKENS

    limited = ChatEncoder(tokenizer, ChatTemplates(caption_qa_turns=1), IMAGE_TOKENS)
    assert labelled_text(tokenizer, limited.caption_qa(caption, 2, QA)).split()[-2] == "red"


def test_caption_qa_without_caption_degrades_to_qa_then_to_nothing(tokenizer) -> None:
    encoder = ChatEncoder(tokenizer, ChatTemplates(), IMAGE_TOKENS)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    qa_only = encoder.caption_qa(None, num_frames=2, qa=QA)
    assert labelled_text(tokenizer, qa_only).split() == ["red", TURN_END_TOKEN, "up", TURN_END_TOKEN]
    assert int((qa_only.input_ids == image_id).sum()) == 2 * IMAGE_TOKENS
    nothing = encoder.caption_qa(None, num_frames=2, qa=[])
    assert (nothing.labels == IGNORE_INDEX).all()
    assert int((nothing.input_ids == image_id).sum()) == 2 * IMAGE_TOKENS


def clip_batch(
    model, tokenizer, seeds: list[int], unannotated: bool = False, expressions_per_clip: int = 1
) -> dict:
    """A collated batch of generated clips through the real ClipEncoder, one sample per expression.

    ``unannotated`` strips object attributes and QA, as a real dataset without QA would have them.
    """
    chat = ChatEncoder(tokenizer, ChatTemplates(), model.vlm.image_tokens)
    encoder = ClipEncoder(chat, None, model.sam.image_size, model.vlm.image_size, [0.5] * 3, [0.25] * 3)
    samples = []
    for seed in seeds:
        video = generate_video(CLIP_CONFIG, seed=seed, video_id=f"video-{seed}")
        if unannotated:
            video = replace(video, objects=[ObjectTrack(id=track.id) for track in video.objects], qa=[])
        samples += [encoder(video, expression) for expression in video.expressions[:expressions_per_clip]]
    return collate_clips(samples, tokenizer.pad_token_id)


def test_clip_batches_carry_the_padded_caption_chat(make_model, tokenizer) -> None:
    _, model = make_model()
    batch = clip_batch(model, tokenizer, [0, 1])
    ids, labels, mask = batch["caption_input_ids"], batch["caption_labels"], batch["caption_attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 2
    assert batch["has_caption"] == [True, True]
    lengths = mask.sum(dim=1)
    assert lengths.min() < ids.shape[1]  # clips with different object counts pad differently
    for row, length in enumerate(lengths.tolist()):
        assert (ids[row, length:] == tokenizer.pad_token_id).all()
        assert (labels[row, length:] == IGNORE_INDEX).all()
    spans = len(batch["qa_questions"][0]) + 1  # caption + every QA pair
    assert len(score_answers(torch.zeros(*ids.shape, len(tokenizer)), labels).answers[0]) == spans


def perfect_logits(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits whose argmax at position i is the label at i + 1 (teacher forcing)."""
    logits = torch.zeros(*labels.shape, vocab)
    target = labels[:, 1:].clamp(min=0)
    logits[:, :-1].scatter_(-1, target[..., None], 1.0)
    return logits


def test_answer_scores_are_one_for_perfect_logits_and_drop_with_one_wrong_token() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]])
    logits = perfect_logits(labels, vocab=10)
    perfect = score_answers(logits, labels)
    assert perfect.token_hits.float().mean() == 1.0 and perfect.answers == [[True, True]]

    logits[0, 2] = 0.0
    logits[0, 2, 9] = 1.0  # predicts 9 where the second token of the first answer is 6
    one_wrong = score_answers(logits, labels)
    assert one_wrong.token_hits.tolist() == [True, False, True]
    assert one_wrong.answers == [[False, True]]


def test_question_kinds_and_the_expression_probe() -> None:
    kinds = {"colour": ["what colour"], "motion": ["which way", "is the"]}
    assert question_kind("What colour is the circle?", kinds) == "colour"
    assert question_kind("Is the red circle moving?", kinds) == "motion"
    assert question_kind("How many circles are there?", kinds) == "other"
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    distances = expression_separation(hidden, ["a", "a", "a", "b"], ["x", "y", "x", "z"])
    # pairs of one clip with different expressions: (0, 1) and (1, 2); never across clips or equal texts
    assert distances.tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers")
def test_the_stage_lowers_the_lm_loss_and_reports_its_scores(
    make_model, tokenizer, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model(
        "stage=vlm_pretrain", f"stage.optimizer.lr={LEARNING_RATE}", "stage.scheduler=null"
    )
    stage = build_stage(cfg, model)
    batch = clip_batch(model, tokenizer, [0, 1], expressions_per_clip=2)
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    trainer, losses = fit_on_batch(
        stage, batch, STEPS, tmp_path, val_batch=batch, val_check_interval=STEPS, num_sanity_val_steps=0
    )
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = trainer.callback_metrics
    for name in METRIC_NAMES:
        assert f"val/{name}" in metrics, sorted(metrics)
    assert 0.0 <= float(metrics["val/answer_token_accuracy"]) <= 1.0
    assert stage.last_validated_step == STEPS
    for key, value in model.sam.state_dict().items():
        assert torch.equal(value, sam_before[key]), f"SAM-2 changed in VLM pre-training: {key}"


def test_nan_loss_and_missing_answers_raise_naming_the_videos(make_model, tokenizer, build_stage) -> None:
    cfg, model = make_model("stage=vlm_pretrain")
    stage = build_stage(cfg, model)
    captionless = clip_batch(model, tokenizer, [0, 1], unannotated=True)
    assert captionless["has_caption"] == [False, False]
    with pytest.raises(NoAnswersError, match="video-0"):
        stage.training_step(captionless, 0)

    batch = clip_batch(model, tokenizer, [0, 1])
    with torch.no_grad():
        model.vlm.model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nan") as caught, torch.no_grad():
        stage.training_step(batch, 0)
    assert "video-0" in str(caught.value) and "video-1" in str(caught.value)


VOCAB = 6


def test_referent_words_are_the_targets_colour_and_shape_each_once(tokenizer) -> None:
    chat = ChatEncoder(tokenizer, ChatTemplates(), image_tokens=1)
    words = tokenizer.convert_ids_to_tokens(chat.referent_words(OBJECTS, [2, 3]).tolist())
    assert sorted(words) == ["blue", "square"]
    words = tokenizer.convert_ids_to_tokens(chat.referent_words(OBJECTS, [1, 2]).tolist())
    assert sorted(words) == ["blue", "circle", "red", "square"]
    unannotated = [ObjectTrack(id=1), *OBJECTS[1:]]
    assert chat.referent_words(unannotated, [1, 2]).numel() == 0


def test_referent_motions_are_the_targets_direction_words_each_once(tokenizer) -> None:
    chat = ChatEncoder(tokenizer, ChatTemplates(), image_tokens=1)
    words = tokenizer.convert_ids_to_tokens(chat.referent_motions(OBJECTS, [1, 3]).tolist())
    assert sorted(words) == ["left", "up"]
    words = tokenizer.convert_ids_to_tokens(chat.referent_motions(OBJECTS, [2]).tolist())
    assert words == ["still"]
    unannotated = [ObjectTrack(id=1, colour="red", shape="circle"), *OBJECTS[1:]]
    assert chat.referent_motions(unannotated, [1, 2]).numel() == 0


def test_referent_loss_and_hits_score_only_the_rows_with_words() -> None:
    word_ids = torch.tensor([[1, 3], [2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]])
    confident = torch.full((3, VOCAB), -20.0)
    confident[0, [1, 3]] = 20.0
    confident[1, 2] = 20.0
    assert referent_rows(word_ids).tolist() == [True, True, False]
    assert referent_loss(confident, word_ids) == pytest.approx(math.log(2) / 2, abs=1e-4)
    assert referent_loss(torch.zeros(3, VOCAB), word_ids) == pytest.approx(math.log(VOCAB))
    assert referent_hits(confident, word_ids).tolist() == [True, True, False]
    wrong = confident.clone()
    wrong[0, 3], wrong[0, 4] = -20.0, 20.0
    assert referent_hits(wrong, word_ids).tolist() == [False, True, False]
    assert referent_loss(confident, torch.full((3, 2), IGNORE_INDEX)) is None


@pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers")
def test_the_stage_teaches_the_seg_state_its_referent_without_exporting_the_head(
    make_model, tokenizer, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model(
        "stage=vlm_pretrain",
        f"stage.optimizer.lr={LEARNING_RATE}",
        "stage.scheduler=null",
        "stage.w_referent=1",
        "stage.w_referent_motion=1",
    )
    stage = build_stage(cfg, model)
    batch = clip_batch(model, tokenizer, [0, 1, 2], expressions_per_clip=3)
    with torch.no_grad():
        before = {name: float(value) for name, value in stage.referent_terms(batch).items()}
    trainer, _ = fit_on_batch(stage, batch, 12, tmp_path, val_batch=batch, val_check_interval=12)
    with torch.no_grad():
        after = {name: float(value) for name, value in stage.referent_terms(batch).items()}
    assert set(before) == {"referent", "referent_motion"}
    for name in before:
        assert after[name] < 0.5 * before[name], (name, before, after)
    for name in ("referent_accuracy", "referent_accuracy_label", "referent_motion_accuracy"):
        assert 0.0 <= float(trainer.callback_metrics[f"val/{name}"]) <= 1.0
    assert not any("referent" in key for key in model.state_dict())


def test_without_the_referent_weights_the_stage_has_no_heads(make_model, build_stage) -> None:
    cfg, model = make_model("stage=vlm_pretrain", "stage.w_referent=0", "stage.w_referent_motion=0")
    stage = build_stage(cfg, model)
    assert stage.referent_head is None
    assert stage.motion_referent_head is None  # its own weight
