"""SAM-2 pre-training's look objective: every object pixel names its object's colour and shape words."""

from __future__ import annotations

import torch

from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
from lightning_desa2va.data.schema import ObjectTrack
from lightning_desa2va.stages.look import frame_clips, look_hits, look_loss, pixel_looks

VOCAB = 10
LOOKS = torch.tensor(  # two clips: object 1 is (2, 5) in clip 0, (3, 6) in clip 1; object 2 only in clip 1
    [[[IGNORE_INDEX] * 2, [2, 5], [IGNORE_INDEX] * 2], [[IGNORE_INDEX] * 2, [3, 6], [4, 7]]]
)


def instance_ids() -> torch.Tensor:
    """Frame-major ids [T·B = 4, 8, 8]: object 1 on the left half of every frame, object 2 at the bottom
    right of clip 1's frames."""
    ids = torch.zeros(4, 8, 8, dtype=torch.long)
    ids[:, :, :4] = 1
    ids[1::2, 4:, 4:] = 2
    return ids


def test_frames_are_mapped_to_their_clip_frame_major() -> None:
    assert frame_clips(2, 3, torch.device("cpu")).tolist() == [0, 1, 0, 1, 0, 1]


def test_each_pixel_gets_the_words_of_its_object_in_its_own_clip() -> None:
    looks = pixel_looks(instance_ids(), LOOKS, frame_clips(2, 2, torch.device("cpu")), size=4)
    assert looks.shape == (4, 4, 4, 2)
    assert looks[0, 0, 0].tolist() == [2, 5] and looks[1, 0, 0].tolist() == [3, 6]
    assert looks[1, 3, 3].tolist() == [4, 7] and looks[3, 3, 3].tolist() == [4, 7]
    assert looks[0, 3, 3].tolist() == [IGNORE_INDEX] * 2  # background


def test_logits_that_name_each_pixels_look_score_hits_and_a_lower_loss() -> None:
    ids = instance_ids()
    looks = pixel_looks(ids, LOOKS, frame_clips(2, 2, torch.device("cpu")), size=8)
    right = torch.zeros(4, VOCAB, 8, 8)
    for word in range(VOCAB):
        right[:, word] = 5.0 * (looks == word).any(dim=-1).float()
    wrong = right.roll(1, dims=1)
    object_pixels = int((ids > 0).sum())
    assert look_hits(right, looks).tolist() == [True] * object_pixels
    assert not look_hits(wrong, looks).any()
    assert look_loss(right, looks) < look_loss(wrong, looks)


def test_frames_without_objects_with_a_look_give_no_loss_and_no_hits() -> None:
    looks = torch.full((4, 8, 8, 2), IGNORE_INDEX)
    assert look_loss(torch.zeros(4, VOCAB, 8, 8), looks) is None
    assert len(look_hits(torch.zeros(4, VOCAB, 8, 8), looks)) == 0


def test_object_looks_hold_each_objects_colour_and_shape_word_in_its_id_row(tokenizer) -> None:
    chat = ChatEncoder(tokenizer, ChatTemplates(), image_tokens=1)
    objects = [
        ObjectTrack(id=1, colour="red", shape="circle"),
        ObjectTrack(id=3, colour="blue", shape="square"),
    ]
    looks = chat.object_looks([*objects, ObjectTrack(id=4)])  # object 4 has no colour or shape
    assert looks.shape == (5, 2)
    assert tokenizer.convert_ids_to_tokens(looks[1].tolist()) == ["red", "circle"]
    assert tokenizer.convert_ids_to_tokens(looks[3].tolist()) == ["blue", "square"]
    for row in (0, 2, 4):  # background, an id no object has, an object without attributes
        assert looks[row].tolist() == [IGNORE_INDEX] * 2
