"""Deterministic synthetic referring-VOS benchmark: coloured shapes that move, occlude and are referred to.

This is the embedded test bed where disentangling motion from appearance should show, so every clip is
*planned* before it is drawn:

* Objects have a look (colour, shape) and a motion (a direction such as ``left``, ``up-left`` or
  ``still``) with a speed. They are drawn in id order (id 1 at the back), so later ones may occlude
  earlier ones; masks hold the visible id per pixel. Every object stays inside the frame for the whole
  clip and keeps at least ``min_visible_fraction`` of its area visible in every frame (best effort).
* Scenes are built from *twins* (same look, different motion) and *mates* (same motion, different look):
  the second object is a twin or a mate of the first, the third takes the other role, further objects
  are twins, mates or free (``extra_object_roles``). No two objects share look and motion.
* Candidate expressions are all attribute combinations (colour / shape / motion) of the scene's objects;
  an expression's targets are exactly the objects matching its ``attributes``. A candidate is kept when
  every attribute in it is needed (dropping any one enlarges the matched set) and

  - ``static`` (appearance only): some target shares its motion with a non-target, so motion alone
    cannot pick the target set;
  - ``motion`` (motion only): some target shares colour and shape with a non-target that moves
    differently, so appearance alone cannot pick the target set;
  - ``mixed`` (motion and appearance): dropping the motion, or dropping all appearance attributes,
    enlarges the matched set.

  For a single target "some target" means "the target". Targets may be several objects ("all the red
  shapes"), as in MeViS. Clips with 3 or more objects always get all three types (the twin/mate plan
  guarantees candidates); 2-object clips get either static or motion expressions, so a split with
  ``min_objects=2`` has somewhat fewer mixed expressions (see :func:`expression_type_counts`).
* QA pairs ask about colour, shape, direction and counts, only through references that pick exactly one
  object (or, for counts, a well-defined set), so every answer is unambiguous.

Everything is drawn by numpy from ``numpy.random.default_rng(seed)``; the same seed gives the same
video on every machine. Words come from the phrase tables of :mod:`~lightning_desa2va.data.synthetic_words`.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_desa2va.data.schema import EXPRESSION_TYPES, MAX_OBJECT_ID, ObjectTrack, VideoSample
from lightning_desa2va.data.synthetic_words import (
    MOTION_VECTORS,
    NAME_RE,
    NO_SPEED,
    NUMBER_WORDS,
    SHAPES,
    STILL,
    ObjectSpec,
    expression_type_of,
    pick,
    referring_candidates,
    select_expressions,
    select_qa,
)

log = logging.getLogger(__name__)


@dataclass
class SyntheticConfig:
    """Every knob of the synthetic benchmark (sizes in pixels, speeds in pixels per frame)."""

    image_size: int = 128
    num_frames: int = 8
    min_objects: int = 2
    max_objects: int = 4
    colours: dict[str, list[int]] = field(
        default_factory=lambda: {
            "red": [220, 40, 40],
            "green": [40, 180, 60],
            "blue": [50, 90, 230],
            "yellow": [235, 210, 40],
        }
    )
    """Colour names and their RGB values (names are the words expressions use)."""
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    motions: tuple[str, ...] = tuple(MOTION_VECTORS)
    speeds: dict[str, float] = field(default_factory=lambda: {"slow": 2.0, "fast": 4.0})
    radius_range: tuple[int, int] = (8, 14)
    """Half-size of a shape (inclusive range): circle radius, half side of the square, ..."""
    margin: int = 2
    """Minimum distance in pixels between a shape and the frame border."""
    background: tuple[int, int, int] = (24, 24, 24)
    background_noise: int = 0
    """Amplitude of uniform per-pixel noise on the background only (0 = flat)."""
    min_visible_fraction: float = 0.35
    """Every object should keep this share of its area visible in every frame."""
    max_layout_attempts: int = 30
    """Position draws tried to satisfy ``min_visible_fraction``; the best draw is kept otherwise."""
    max_scene_attempts: int = 100
    """Scene plans tried until the required expression types are available."""
    extra_object_roles: dict[str, float] = field(
        default_factory=lambda: {"twin": 0.4, "mate": 0.4, "free": 0.2}
    )
    """Probabilities of the role of objects beyond the third."""
    expressions_per_type: dict[str, int] = field(
        default_factory=lambda: {"static": 2, "motion": 2, "mixed": 4}
    )
    """Maximum expressions of each type per clip (mixed candidates are the scarcest, so it gets more)."""
    max_qa: int = 4

    def __post_init__(self) -> None:
        """Normalise containers (YAML gives lists) and refuse configs that cannot produce valid clips."""
        self.colours = {str(k): [int(c) for c in v] for k, v in self.colours.items()}
        self.shapes = tuple(self.shapes)
        self.motions = tuple(self.motions)
        self.speeds = {str(k): float(v) for k, v in self.speeds.items()}
        self.radius_range = (int(self.radius_range[0]), int(self.radius_range[1]))
        self.background = tuple(int(c) for c in self.background)
        self.extra_object_roles = {str(k): float(v) for k, v in self.extra_object_roles.items()}
        self.expressions_per_type = {str(k): int(v) for k, v in self.expressions_per_type.items()}
        self._validate()

    def _validate(self) -> None:
        """Fail early, naming the knob, on configs the generator cannot honour."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"SyntheticConfig: {msg}")

        if not 2 <= self.min_objects <= self.max_objects:
            raise bad(f"need 2 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > min(MAX_OBJECT_ID, len(NUMBER_WORDS) - 1):
            raise bad(f"max_objects {self.max_objects} exceeds {len(NUMBER_WORDS) - 1}")
        for name in [*self.colours, *self.shapes, *self.speeds]:
            if not NAME_RE.match(name):
                raise bad(f"names must be single lower-case words, got {name!r}")
        if unknown := set(self.shapes) - set(SHAPES):
            raise bad(f"shapes {sorted(unknown)} unknown; known: {SHAPES}")
        if unknown := set(self.motions) - set(MOTION_VECTORS):
            raise bad(f"motions {sorted(unknown)} unknown; known: {tuple(MOTION_VECTORS)}")
        if len(set(self.motions)) < 2 or len(self.colours) * len(self.shapes) < 2:
            raise bad("need at least 2 motions and 2 looks (colour x shape) for twins and mates")
        if len(self.colours) * len(self.shapes) * len(self.motions) < self.max_objects:
            raise bad("fewer distinct (colour, shape, motion) combinations than max_objects")
        if not self.speeds or min(self.speeds.values()) <= 0:
            raise bad(f"speeds must be positive, got {self.speeds}")
        if NO_SPEED in self.speeds:
            raise bad(f"speed label {NO_SPEED!r} is reserved for still objects")
        if not 1 <= self.radius_range[0] <= self.radius_range[1]:
            raise bad(f"radius_range must be increasing and positive, got {self.radius_range}")
        travel = max(self.speeds.values()) * (self.num_frames - 1)
        if 2 * (self.radius_range[1] + self.margin) + travel > self.image_size - 1:
            raise bad(
                f"a fast object of radius {self.radius_range[1]} travels {travel:.0f} px and leaves a "
                f"{self.image_size} px frame; lower speeds/num_frames/radius_range or raise image_size"
            )
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise bad(f"min_visible_fraction must lie in [0, 1], got {self.min_visible_fraction}")
        if (
            set(self.extra_object_roles) - {"twin", "mate", "free"}
            or sum(self.extra_object_roles.values()) <= 0
        ):
            raise bad(f"extra_object_roles must weight 'twin', 'mate', 'free', got {self.extra_object_roles}")
        if set(self.expressions_per_type) != set(EXPRESSION_TYPES):
            raise bad(f"expressions_per_type must have keys {EXPRESSION_TYPES}")


@dataclass
class ObjectLayout:
    """Where an object is drawn: its track, half-size and centre (x, y) in every frame."""

    track: ObjectTrack
    radius: int
    centres: np.ndarray


# ----------------------------------------------------------------------------------------- geometry


def rasterise(shape: str, centre: tuple[float, float], radius: float, size: tuple[int, int]) -> np.ndarray:
    """Boolean HxW mask of a shape whose bounding box is ``centre +- radius`` (pixel centres at integers)."""
    height, width = size
    ys, xs = np.ogrid[:height, :width]
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= radius) & (np.abs(dx) * 2.0 <= dy + radius)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _velocity(cfg: SyntheticConfig, track: ObjectTrack) -> np.ndarray:
    """Pixels per frame (x, y) of a track."""
    speed = 0.0 if track.motion == STILL else cfg.speeds[track.speed]
    return np.asarray(MOTION_VECTORS[track.motion]) * speed


def _draw_layout(
    rng: np.random.Generator, cfg: SyntheticConfig, tracks: list[ObjectTrack], radii: list[int]
) -> list[ObjectLayout]:
    """Draw start positions that keep every object inside the frame for the whole clip."""
    steps = np.arange(cfg.num_frames)[:, None]
    layouts = []
    for track, radius in zip(tracks, radii, strict=True):
        velocity = _velocity(cfg, track)
        travel = velocity * (cfg.num_frames - 1)
        low = radius + cfg.margin - np.minimum(travel, 0.0)
        high = cfg.image_size - 1 - radius - cfg.margin - np.maximum(travel, 0.0)
        start = rng.uniform(low, high)
        layouts.append(ObjectLayout(track, radius, start[None, :] + steps * velocity[None, :]))
    return layouts


def _rasters(cfg: SyntheticConfig, layouts: list[ObjectLayout]) -> np.ndarray:
    """Full (unoccluded) shape masks, shape (objects, frames, H, W)."""
    size = (cfg.image_size, cfg.image_size)
    return np.stack(
        [
            np.stack([rasterise(lay.track.shape, tuple(c), lay.radius, size) for c in lay.centres])
            for lay in layouts
        ]
    )


def _compose_masks(rasters: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Visible instance ids per frame (T, H, W): later objects cover earlier ones."""
    masks = np.zeros(rasters.shape[1:], dtype=np.uint8)
    for raster, obj_id in zip(rasters, ids, strict=True):
        masks[raster] = obj_id
    return masks


def _min_visible_fraction(rasters: np.ndarray, masks: np.ndarray, ids: Sequence[int]) -> float:
    """Smallest visible share of any object's area over all frames."""
    worst = 1.0
    for raster, obj_id in zip(rasters, ids, strict=True):
        area = raster.sum(axis=(1, 2))
        visible = (masks == obj_id).sum(axis=(1, 2))
        worst = min(worst, float((visible / np.maximum(area, 1)).min()))
    return worst


# --------------------------------------------------------------------------------------- referring


# --------------------------------------------------------------------------------------- planning


def _new_spec(
    rng: np.random.Generator, cfg: SyntheticConfig, specs: list[ObjectSpec], role: str
) -> ObjectSpec | None:
    """A spec in the given relation to an existing one (twin: same look; mate: same motion)."""
    looks = [(c, s) for c in cfg.colours for s in cfg.shapes]
    used = set(specs)
    if role == "twin":
        options = [ObjectSpec(*o.look, m) for o in specs for m in cfg.motions]
    elif role == "mate":
        options = [ObjectSpec(c, s, o.motion) for o in specs for (c, s) in looks if (c, s) != o.look]
    else:
        options = [ObjectSpec(c, s, m) for (c, s) in looks for m in cfg.motions]
    options = [o for o in dict.fromkeys(options) if o not in used]
    return options[int(rng.integers(len(options)))] if options else None


def _plan_scene(rng: np.random.Generator, cfg: SyntheticConfig, count: int) -> list[ObjectSpec]:
    """Looks and motions built from twins and mates (see the module docstring)."""
    first = ObjectSpec(pick(rng, list(cfg.colours)), pick(rng, cfg.shapes), pick(rng, cfg.motions))
    specs = [first]
    first_role = pick(rng, ("twin", "mate"))
    role_names = list(cfg.extra_object_roles)
    weights = np.asarray([cfg.extra_object_roles[r] for r in role_names])
    for k in range(1, count):
        if k == 1:
            role = first_role
        elif k == 2:
            role = "mate" if first_role == "twin" else "twin"
        else:
            role = role_names[int(rng.choice(len(role_names), p=weights / weights.sum()))]
        spec = _new_spec(rng, cfg, specs, role) or _new_spec(rng, cfg, specs, "free")
        assert spec is not None  # the config check guarantees enough combinations
        specs.append(spec)
    return specs


def _scene_is_usable(candidates: list[tuple[dict[str, str], frozenset[int]]], count: int) -> bool:
    """3+ objects must offer every type; 2 objects at least one expression."""
    kinds = {expression_type_of(a) for a, _ in candidates}
    return kinds == set(EXPRESSION_TYPES) if count >= 3 else bool(kinds)


def generate_video_with_layout(
    cfg: SyntheticConfig, seed: int, video_id: str
) -> tuple[VideoSample, list[ObjectLayout]]:
    """Like :func:`generate_video`, also returning where each object was drawn (for tests and plots)."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(cfg.max_scene_attempts):
        specs = _plan_scene(rng, cfg, count)
        candidates = referring_candidates(specs)
        if _scene_is_usable(candidates, count):
            break
    else:
        raise RuntimeError(
            f"{video_id} (seed {seed}): no usable scene in {cfg.max_scene_attempts} attempts; "
            "raise max_scene_attempts or widen colours/shapes/motions"
        )

    ids = list(range(1, count + 1))  # also the drawing order
    tracks = [
        ObjectTrack(
            id=i,
            colour=s.colour,
            shape=s.shape,
            motion=s.motion,
            speed=NO_SPEED if s.motion == STILL else pick(rng, list(cfg.speeds)),
        )
        for i, s in zip(ids, specs, strict=True)
    ]
    radii = [int(rng.integers(cfg.radius_range[0], cfg.radius_range[1] + 1)) for _ in tracks]
    best: tuple[float, list[ObjectLayout], np.ndarray, np.ndarray] | None = None
    for _ in range(cfg.max_layout_attempts):
        layouts = _draw_layout(rng, cfg, tracks, radii)
        rasters = _rasters(cfg, layouts)
        masks = _compose_masks(rasters, ids)
        visible = _min_visible_fraction(rasters, masks, ids)
        if best is None or visible > best[0]:
            best = (visible, layouts, rasters, masks)
        if visible >= cfg.min_visible_fraction:
            break
    assert best is not None
    visible, layouts, rasters, masks = best
    if visible < cfg.min_visible_fraction:
        log.debug("%s: best layout keeps only %.2f of an object visible", video_id, visible)

    size = (cfg.num_frames, cfg.image_size, cfg.image_size, 3)
    frames = np.empty(size, dtype=np.uint8)
    frames[...] = cfg.background
    if cfg.background_noise > 0:
        noise = rng.integers(-cfg.background_noise, cfg.background_noise + 1, size=size, dtype=np.int16)
        frames = np.clip(frames + noise, 0, 255).astype(np.uint8)
    for raster, track in zip(rasters, tracks, strict=True):
        frames[raster] = cfg.colours[track.colour]

    expressions = select_expressions(rng, cfg, specs, ids, candidates)
    qa = select_qa(rng, cfg, specs)
    sample = VideoSample(
        video_id=video_id,
        frames=list(frames),
        masks=list(masks),
        objects=tracks,
        expressions=expressions,
        qa=qa,
    )
    return sample, layouts


def generate_video(cfg: SyntheticConfig, seed: int, video_id: str) -> VideoSample:
    """One clip, fully determined by ``(cfg, seed)``; ``video_id`` only names it."""
    return generate_video_with_layout(cfg, seed, video_id)[0]


def video_seed(seed: int, split: str, index: int) -> int:
    """Seed of one clip of a split; independent of Python's hash randomisation."""
    entropy = [seed, zlib.crc32(split.encode("utf-8")), index]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def generate_split(cfg: SyntheticConfig, split: str, num_videos: int, seed: int) -> Iterator[VideoSample]:
    """Clips ``{split}-000000`` ... of a split; different splits (or seeds) give different clips."""
    for index in range(num_videos):
        yield generate_video(cfg, video_seed(seed, split, index), f"{split}-{index:06d}")


def expression_type_counts(samples: Iterable[VideoSample]) -> dict[str, int]:
    """Expressions per type (plus ``multi_object``: those naming several objects) over some clips."""
    counts: Counter[str] = Counter({k: 0 for k in (*EXPRESSION_TYPES, "multi_object")})
    for sample in samples:
        for expr in sample.expressions:
            counts[expr.type] += 1
            counts["multi_object"] += len(expr.object_ids) > 1
    return dict(counts)
