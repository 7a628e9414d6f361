"""The synthetic benchmark: determinism, geometry, and that every expression needs the cues it claims."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from lightning_desa2va.data.schema import EXPRESSION_TYPES, ObjectTrack, VideoSample
from lightning_desa2va.data.synthetic import (
    ObjectLayout,
    SyntheticConfig,
    expression_type_counts,
    generate_split,
    generate_video,
    generate_video_with_layout,
    rasterise,
    video_seed,
)
from lightning_desa2va.data.synthetic_words import MOTION_WORDS, NUMBER_WORDS, split_words, vocabulary

CFG = SyntheticConfig()
NUM_CHECKED = 200
NUM_GEOMETRY = 40
ATTRIBUTE_KEYS = ("colour", "shape", "motion")
CENTROID_TOL_PX = 0.25
_D = 1 / np.sqrt(2)
# written out here, not imported, so a wrong table in the generator fails: image y grows downwards
EXPECTED_DIRECTION = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-_D, -_D),
    "up-right": (_D, -_D),
    "down-left": (-_D, _D),
    "down-right": (_D, _D),
    "still": (0, 0),
}
STEP_TOL_PX = 1.0


@pytest.fixture(scope="module")
def videos() -> list[VideoSample]:
    return list(generate_split(CFG, "train", NUM_CHECKED, seed=0))


@pytest.fixture(scope="module")
def with_layouts() -> list[tuple[VideoSample, list[ObjectLayout]]]:
    return [generate_video_with_layout(CFG, video_seed(1, "val", i), f"v{i}") for i in range(NUM_GEOMETRY)]


def _match(objects: list[ObjectTrack], attributes: dict[str, str]) -> set[int]:
    return {o.id for o in objects if all(getattr(o, k) == v for k, v in attributes.items())}


def _same(a: VideoSample, b: VideoSample) -> bool:
    return (
        a.meta() == b.meta()
        and all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames, strict=True))
        and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    )


def test_same_seed_same_video_and_other_seed_differs() -> None:
    a, b = generate_video(CFG, 123, "x"), generate_video(CFG, 123, "x")
    assert _same(a, b)
    c = generate_video(CFG, 124, "x")
    assert not _same(a, c)


def test_splits_are_deterministic_and_differ() -> None:
    train = list(generate_split(CFG, "train", 3, seed=5))
    again = list(generate_split(CFG, "train", 3, seed=5))
    val = list(generate_split(CFG, "val", 3, seed=5))
    other_seed = list(generate_split(CFG, "train", 3, seed=6))
    assert all(_same(x, y) for x, y in zip(train, again, strict=True))
    assert [v.video_id for v in train] == ["train-000000", "train-000001", "train-000002"]
    assert not any(np.array_equal(x.frames[0], y.frames[0]) for x, y in zip(train, val, strict=True))
    assert not any(np.array_equal(x.frames[0], y.frames[0]) for x, y in zip(train, other_seed, strict=True))


def test_arrays_have_the_documented_layout(videos: list[VideoSample]) -> None:
    for video in videos[:20]:
        assert len(video.frames) == len(video.masks) == CFG.num_frames
        for frame, mask in zip(video.frames, video.masks, strict=True):
            assert frame.shape == (CFG.image_size, CFG.image_size, 3) and frame.dtype == np.uint8
            assert mask.shape == (CFG.image_size, CFG.image_size) and mask.dtype == np.uint8
        assert CFG.min_objects <= len(video.objects) <= CFG.max_objects
        assert [o.id for o in video.objects] == list(range(1, len(video.objects) + 1))
        looks_and_motions = [(o.colour, o.shape, o.motion) for o in video.objects]
        assert len(set(looks_and_motions)) == len(looks_and_motions)


def test_masks_are_the_visible_part_of_each_shape(with_layouts) -> None:
    size = (CFG.image_size, CFG.image_size)
    occluded_somewhere = False
    for video, layouts in with_layouts:
        for t, mask in enumerate(video.masks):
            rasters = [rasterise(lay.track.shape, tuple(lay.centres[t]), lay.radius, size) for lay in layouts]
            for k, lay in enumerate(layouts):
                cx, cy = lay.centres[t]
                assert (
                    lay.radius <= cx <= size[1] - 1 - lay.radius
                    and lay.radius <= cy <= size[0] - 1 - lay.radius
                )
                in_front = np.any(rasters[k + 1 :], axis=0) if k + 1 < len(rasters) else np.zeros(size, bool)
                np.testing.assert_array_equal(mask == lay.track.id, rasters[k] & ~in_front)
                occluded_somewhere |= bool((rasters[k] & in_front).any())
            assert not (mask.astype(bool) ^ np.any(rasters, axis=0)).any()
    assert occluded_somewhere, "no occlusion in any clip: the benchmark should contain some"


def test_frame_pixels_have_object_and_background_colours(videos: list[VideoSample]) -> None:
    for video in videos[:20]:
        for frame, mask in zip(video.frames, video.masks, strict=True):
            assert (frame[mask == 0] == CFG.background).all()
            for obj in video.objects:
                assert (frame[mask == obj.id] == CFG.colours[obj.colour]).all()


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_shapes_move_as_labelled(with_layouts) -> None:
    size = (CFG.image_size, CFG.image_size)
    checked_visible_steps = 0
    for video, layouts in with_layouts:
        for lay in layouts:
            track = lay.track
            if track.motion == "still":
                assert track.speed == "none"
                expected = np.zeros(2)
            else:
                expected = np.asarray(EXPECTED_DIRECTION[track.motion]) * CFG.speeds[track.speed]
            rasters = [rasterise(track.shape, tuple(c), lay.radius, size) for c in lay.centres]
            centroids = np.stack([_centroid(r) for r in rasters])
            mean_step = (centroids[-1] - centroids[0]) / (len(centroids) - 1)
            np.testing.assert_allclose(mean_step, expected, atol=CENTROID_TOL_PX)
            for t in range(len(rasters) - 1):
                visible = [video.masks[s] == track.id for s in (t, t + 1)]
                if all(np.array_equal(v, r) for v, r in zip(visible, rasters[t : t + 2], strict=True)):
                    step = _centroid(visible[1]) - _centroid(visible[0])
                    np.testing.assert_allclose(step, expected, atol=STEP_TOL_PX)
                    checked_visible_steps += 1
    assert checked_visible_steps > NUM_GEOMETRY


def test_every_object_stays_visible(videos: list[VideoSample]) -> None:
    for video in videos:
        for obj in video.objects:
            assert all((mask == obj.id).any() for mask in video.masks), (video.video_id, obj)


def _parse_reference(words: list[str]) -> dict[str, str]:
    """Attributes a reference names, read back from its words (independent of the generator's tables)."""
    attributes: dict[str, str] = {}
    for word in words:
        if word in CFG.colours:
            attributes["colour"] = word
        for shape in CFG.shapes:
            if word in (shape, shape + "s"):
                attributes["shape"] = shape
    if "still" in words or ("not" in words and "moving" in words):
        attributes["motion"] = "still"
    else:
        for verb in ("moving", "moves", "move"):
            if verb in words:
                said = " ".join(words[words.index(verb) + 1 :])
                attributes["motion"] = {v: k for k, v in MOTION_WORDS.items()}[said]
    return attributes


def _appearance_queries(objects: list[ObjectTrack]) -> list[dict[str, str]]:
    return [
        {k: getattr(o, k) for k in keys}
        for o in objects
        for keys in (("colour",), ("shape",), ("colour", "shape"))
    ]


def test_every_expression_picks_exactly_its_targets(videos: list[VideoSample]) -> None:
    for video in videos:
        objects = video.objects
        for expr in video.expressions:
            attrs, targets = expr.attributes, set(expr.object_ids)
            where = (video.video_id, expr)
            assert targets and _match(objects, attrs) == targets, where
            assert sorted(expr.object_ids) == expr.object_ids, where
            assert _parse_reference(split_words(expr.text)) == attrs, where
            has_motion = "motion" in attrs
            has_look = bool({"colour", "shape"} & set(attrs))
            assert expr.type == ("mixed" if has_motion and has_look else "motion" if has_motion else "static")
            for key in attrs:  # every attribute is needed
                if len(attrs) > 1:
                    assert _match(objects, {k: v for k, v in attrs.items() if k != key}) > targets, where
            tgt = [o for o in objects if o.id in targets]
            others = [o for o in objects if o.id not in targets]
            if expr.type == "static":  # motion alone cannot pick it
                assert any(
                    o.motion == t.motion and o.shape + o.colour != t.shape + t.colour
                    for t in tgt
                    for o in others
                )
                assert all(_match(objects, {"motion": m}) != targets for m in {o.motion for o in objects})
            elif expr.type == "motion":  # appearance alone cannot pick it
                assert any(
                    (o.colour, o.shape) == (t.colour, t.shape) and o.motion != t.motion
                    for t in tgt
                    for o in others
                )
                assert all(_match(objects, q) != targets for q in _appearance_queries(objects)), where
            else:  # both are needed
                assert _match(objects, {k: v for k, v in attrs.items() if k != "motion"}) > targets, where
                assert _match(objects, {"motion": attrs["motion"]}) > targets, where


def test_labels_name_the_targets_appearance(videos: list[VideoSample]) -> None:
    for video in videos:
        by_id = {o.id: o for o in video.objects}
        for expr in video.expressions:
            words = split_words(expr.label)
            targets = [by_id[i] for i in expr.object_ids]
            if len(targets) == 1:
                assert expr.label == f"{targets[0].colour} {targets[0].shape}"
            colours = {t.colour for t in targets}
            shapes = {t.shape for t in targets}
            if len(colours) == 1:
                assert targets[0].colour in words
            if len(shapes) == 1:
                assert {targets[0].shape, targets[0].shape + "s"} & set(words)
            assert not {w for w in words if w in CFG.colours} - colours
            assert not {w.rstrip("s") for w in words if w.rstrip("s") in CFG.shapes} - shapes


def test_type_coverage_and_balance(videos: list[VideoSample]) -> None:
    for video in videos:
        kinds = {e.type for e in video.expressions}
        if len(video.objects) >= 3:
            assert kinds == set(EXPRESSION_TYPES), video.video_id
        else:
            assert kinds, video.video_id
    counts = expression_type_counts(videos)
    total = sum(counts[k] for k in EXPRESSION_TYPES)
    assert counts["multi_object"] > 0.1 * total
    for kind in EXPRESSION_TYPES:
        assert 0.2 < counts[kind] / total < 0.45, counts


_QUESTION_PATTERNS = {
    "colour": re.compile(r"^What colour is the (.+)\?$"),
    "shape": re.compile(r"^What shape is the (.+)\?$"),
    "direction": re.compile(r"^Which way is the (.+) moving\?$"),
    "moving": re.compile(r"^Is the (.+) moving\?$"),
    "count_still": re.compile(r"^How many (.+) are not moving\?$"),
    "count_motion": re.compile(r"^How many (.+) are moving (.+)\?$"),
    "count": re.compile(r"^How many (.+) are there\?$"),
}


def test_qa_answers_follow_from_the_objects(videos: list[VideoSample]) -> None:
    seen: Counter[str] = Counter()
    for video in videos:
        assert len(video.qa) <= CFG.max_qa
        assert len({q.question for q in video.qa}) == len(video.qa)
        for qa in video.qa:
            kind, found = next(
                (k, p.match(qa.question)) for k, p in _QUESTION_PATTERNS.items() if p.match(qa.question)
            )
            seen[kind] += 1
            attrs = _parse_reference(split_words(found.group(1)))
            if kind == "count_still":
                attrs["motion"] = "still"
            if kind == "count_motion":
                attrs["motion"] = {v: k for k, v in MOTION_WORDS.items()}[found.group(2)]
            matched = [o for o in video.objects if o.id in _match(video.objects, attrs)]
            where = (video.video_id, qa)
            if kind.startswith("count"):
                assert qa.answer == NUMBER_WORDS[len(matched)], where
                continue
            assert len(matched) == 1, where
            obj = matched[0]
            expected = {
                "colour": obj.colour,
                "shape": obj.shape,
                "direction": MOTION_WORDS[obj.motion],
                "moving": "no" if obj.motion == "still" else "yes",
            }[kind]
            assert qa.answer == expected, where
            assert kind not in attrs, where  # the question does not give its answer away
    assert {"colour", "shape", "direction", "count"} <= set(seen)


def test_vocabulary_covers_every_emitted_word(videos: list[VideoSample]) -> None:
    vocab = vocabulary(CFG)
    assert vocab == sorted(set(vocab)) == vocabulary(SyntheticConfig())
    assert all(w == w.lower() and " " not in w and "-" not in w for w in vocab)
    assert {"?", ",", "red", "triangle", "left", "still", "yes"} <= set(vocab)
    emitted = set()
    for video in videos:
        for text in itertools.chain(
            (e.text for e in video.expressions),
            (e.label for e in video.expressions),
            (q.question for q in video.qa),
            (q.answer for q in video.qa),
        ):
            emitted.update(split_words(text))
    assert emitted <= set(vocab), emitted - set(vocab)


def test_rasterise_areas_and_unknown_shape() -> None:
    radius, size = 10, (64, 64)
    areas = {
        s: int(rasterise(s, (32.0, 32.0), radius, size).sum())
        for s in ("circle", "square", "triangle", "diamond")
    }
    assert areas["square"] == (2 * radius + 1) ** 2
    assert abs(areas["circle"] - np.pi * radius**2) < 0.05 * areas["circle"]
    assert abs(areas["triangle"] - 2 * radius**2) < 0.1 * areas["triangle"]
    assert abs(areas["diamond"] - 2 * radius**2) < 0.1 * areas["diamond"]
    with pytest.raises(ValueError, match="hexagon"):
        rasterise("hexagon", (1.0, 1.0), 1, size)


def test_config_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=64, speeds={"fast": 8.0})
    with pytest.raises(ValueError, match="hexagon"):
        SyntheticConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticConfig(min_objects=1)
    # YAML gives lists; the config normalises them and the generator still works
    cfg = SyntheticConfig(
        shapes=["circle", "diamond"], motions=["left", "right", "still"], min_objects=3, max_objects=3
    )
    video = generate_video(cfg, 0, "x")
    assert {o.shape for o in video.objects} <= {"circle", "diamond"}
    assert {e.type for e in video.expressions} == set(EXPRESSION_TYPES)
