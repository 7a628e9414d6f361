"""The segmentation stages' motion objective: each object pixel of the image embedding names its direction."""

from __future__ import annotations

import torch

from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
from lightning_desa2va.data.schema import ObjectTrack
from lightning_desa2va.stages.motion import MotionProbe

VOCAB, LEFT, UP, STILL = 6, 1, 2, 3
NONE = [IGNORE_INDEX] * 2
# Object 1 moves left in clip 0 and stays still in clip 1; object 2 (clip 0 only) moves up-left.
MOTIONS = torch.tensor([[NONE, [LEFT, IGNORE_INDEX], [UP, LEFT]], [NONE, [STILL, IGNORE_INDEX], NONE]])


def instance_masks() -> torch.Tensor:
    """[B=2, T=2, 8, 8]: object 1 on the left half of every frame, object 2 bottom right in clip 0."""
    ids = torch.zeros(2, 2, 8, 8, dtype=torch.long)
    ids[..., :4] = 1
    ids[0, :, 4:, 4:] = 2
    return ids


def naming_embeddings(ids: torch.Tensor) -> torch.Tensor:
    """Clip-major embeddings [B·T, VOCAB, 8, 8] whose channel w is high where the object moves w."""
    embeddings = torch.zeros(4, VOCAB, 8, 8)
    for row, (clip, frame) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for obj in (1, 2):
            for word in MOTIONS[clip, obj].tolist():
                if word != IGNORE_INDEX:
                    embeddings[row, word][ids[clip, frame] == obj] = 5.0
    return embeddings


def identity_probe() -> MotionProbe:
    probe = MotionProbe(embed_dim=VOCAB, vocab_size=VOCAB, grid=8)
    with torch.no_grad():
        probe.head.weight.copy_(torch.eye(VOCAB)[..., None, None])
        probe.head.bias.zero_()
    return probe


def test_every_object_pixel_of_every_clip_is_scored_against_its_own_clips_motion() -> None:
    ids, probe = instance_masks(), identity_probe()
    right = naming_embeddings(ids)
    loss, hits = probe(right, ids, MOTIONS)
    assert hits.tolist() == [True] * int((ids > 0).sum())
    frame_major = right[[0, 2, 1, 3]]  # frames in the other order: clip 1's frame 0 scored as clip 0's
    wrong_loss, wrong_hits = probe(frame_major, ids, MOTIONS)
    assert not wrong_hits.all()
    assert loss < wrong_loss


def test_clips_without_any_object_motion_give_no_loss() -> None:
    ids = instance_masks()
    loss, hits = identity_probe()(naming_embeddings(ids), ids, torch.full_like(MOTIONS, IGNORE_INDEX))
    assert loss is None
    assert len(hits) == 0


def test_object_motions_hold_each_objects_direction_words_in_its_id_row(tokenizer) -> None:
    chat = ChatEncoder(tokenizer, ChatTemplates(), image_tokens=1)
    objects = [ObjectTrack(id=1, motion="up-left"), ObjectTrack(id=2, motion="still")]
    motions = chat.object_motions([*objects, ObjectTrack(id=4)])  # object 4 has no motion
    assert motions.shape == (5, 2)
    assert tokenizer.convert_ids_to_tokens(motions[1].tolist()) == ["up", "left"]
    assert tokenizer.convert_ids_to_tokens(motions[2, :1].tolist()) == ["still"]
    assert motions[2, 1] == IGNORE_INDEX
    for row in (0, 3, 4):  # background, an id no object has, an object without a motion
        assert motions[row].tolist() == NONE
