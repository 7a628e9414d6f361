"""The words of the synthetic benchmark: which attribute combinations refer to exactly their targets, how
expressions, stage-1 labels and QA pairs are worded, and the vocabulary a word-level tokenizer needs.

Every word the generator emits comes from the phrase tables here or from the config's names; every choice
is drawn from the clip's own ``numpy`` generator, so the same seed words a clip the same way everywhere.
See :mod:`lightning_desa2va.data.synthetic` for the rules an expression of each type must satisfy.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lightning_desa2va.data.schema import EXPRESSION_TYPES, Expression, QAPair

if TYPE_CHECKING:
    from lightning_desa2va.data.synthetic import SyntheticConfig

COLOUR, SHAPE, MOTION = "colour", "shape", "motion"
APPEARANCE_KEYS = (COLOUR, SHAPE)
STILL = "still"
NO_SPEED = "none"
"""Speed label of still objects."""

_DIAGONAL = 1.0 / math.sqrt(2.0)
MOTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_DIAGONAL, -_DIAGONAL),
    "up-right": (_DIAGONAL, -_DIAGONAL),
    "down-left": (-_DIAGONAL, _DIAGONAL),
    "down-right": (_DIAGONAL, _DIAGONAL),
    STILL: (0.0, 0.0),
}
"""Unit (x, y) image-plane direction of every motion word (y grows downwards)."""

MOTION_WORDS: dict[str, str] = {m: m.replace("-", " and ") for m in MOTION_VECTORS}
"""How a motion is said in text and answers (no hyphens, so a word-level tokenizer sees plain words)."""

SHAPES = ("circle", "square", "triangle", "diamond")
"""Shapes :func:`rasterise` can draw."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
"""Answers of counting questions; ``max_objects`` may not exceed the last."""

GENERIC_NOUNS = ("shape", "object")
"""Nouns used when an expression does not name the shape."""

# Phrase tables: every word the generator emits comes from here or from the config's names.
_STILL_CLAUSES = {
    False: ("that stays still", "that is not moving"),
    True: ("that stay still", "that are not moving"),
}
_MOVE_CLAUSES = {False: ("moving {dir}", "that moves {dir}"), True: ("moving {dir}", "that move {dir}")}
_SINGULAR_DETERMINER = "the"
_PLURAL_DETERMINERS = ("the", "all the")
_QUESTIONS = {
    "colour": "What colour is the {ref}?",
    "shape": "What shape is the {ref}?",
    "direction": "Which way is the {ref} moving?",
    "moving": "Is the {ref} moving?",
    "count": "How many {ref} are there?",
    "count_motion": "How many {ref} are moving {dir}?",
    "count_still": "How many {ref} are not moving?",
}
_YES, _NO = "yes", "no"
_LABEL_SEPARATOR, _LABEL_LAST_SEPARATOR = ", ", " and "
_PLURAL_SUFFIX = "s"

_WORD_RE = re.compile(r"\w+|[^\w\s]")
NAME_RE = re.compile(r"^[a-z]+$")


def split_words(text: str) -> list[str]:
    """Lower-case words with punctuation as separate tokens, the unit :func:`vocabulary` counts in."""
    return _WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class ObjectSpec:
    """Look and motion of one planned object."""

    colour: str
    shape: str
    motion: str

    def get(self, key: str) -> str:
        """Attribute value by schema key."""
        return getattr(self, key)

    @property
    def look(self) -> tuple[str, str]:
        """Appearance, what a motion expression's distractor shares."""
        return (self.colour, self.shape)


def _matches(specs: Sequence[ObjectSpec], attributes: dict[str, str]) -> frozenset[int]:
    """Indices of the objects whose attributes match."""
    return frozenset(i for i, s in enumerate(specs) if all(s.get(k) == v for k, v in attributes.items()))


def expression_type_of(keys: Iterable[str]) -> str:
    """Type of an expression from the attribute keys it uses."""
    keys = set(keys)
    if MOTION not in keys:
        return "static"
    return "mixed" if keys & set(APPEARANCE_KEYS) else "motion"


def _is_minimal(specs: Sequence[ObjectSpec], attributes: dict[str, str], targets: frozenset[int]) -> bool:
    """Every attribute is needed: dropping any one enlarges the matched set."""
    if len(attributes) == 1:
        return len(targets) < len(specs)
    return all(
        _matches(specs, {k: v for k, v in attributes.items() if k != key}) != targets for key in attributes
    )


def _needs_its_cues(specs: Sequence[ObjectSpec], attributes: dict[str, str], targets: frozenset[int]) -> bool:
    """The type-specific condition that makes the benchmark need motion and/or appearance."""
    kind = expression_type_of(attributes)
    others = [s for i, s in enumerate(specs) if i not in targets]
    tgt = [specs[i] for i in targets]
    if kind == "static":
        return any(o.motion == t.motion for t in tgt for o in others)
    if kind == "motion":
        return any(o.look == t.look for t in tgt for o in others)
    no_motion = {k: v for k, v in attributes.items() if k != MOTION}
    motion_only = {MOTION: attributes[MOTION]}
    return _matches(specs, no_motion) > targets and _matches(specs, motion_only) > targets


def referring_candidates(specs: Sequence[ObjectSpec]) -> list[tuple[dict[str, str], frozenset[int]]]:
    """All valid (attributes, target indices) of a scene, in a deterministic order."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    out = []
    all_keys = (COLOUR, SHAPE, MOTION)
    for size in range(1, len(all_keys) + 1):
        for keys in itertools.combinations(all_keys, size):
            for spec in specs:
                attributes = {k: spec.get(k) for k in keys}
                signature = tuple(attributes.items())
                if signature in seen:
                    continue
                seen.add(signature)
                targets = _matches(specs, attributes)
                if _is_minimal(specs, attributes, targets) and _needs_its_cues(specs, attributes, targets):
                    out.append((attributes, targets))
    return out


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One element, drawn by the clip's generator."""
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, attributes: dict[str, str], plural: bool) -> str:
    """'red circle', 'shapes', 'green object' ... from the appearance attributes."""
    noun = attributes.get(SHAPE) or pick(rng, GENERIC_NOUNS)
    if plural:
        noun += _PLURAL_SUFFIX
    return f"{attributes[COLOUR]} {noun}" if COLOUR in attributes else noun


def _motion_clause(rng: np.random.Generator, motion: str, plural: bool) -> str:
    """'moving left', 'that stays still', ..."""
    if motion == STILL:
        return pick(rng, _STILL_CLAUSES[plural])
    return pick(rng, _MOVE_CLAUSES[plural]).format(dir=MOTION_WORDS[motion])


def _reference(rng: np.random.Generator, attributes: dict[str, str], plural: bool) -> str:
    """Noun phrase plus motion clause, without determiner."""
    phrase = _noun_phrase(rng, attributes, plural)
    if MOTION in attributes:
        phrase += " " + _motion_clause(rng, attributes[MOTION], plural)
    return phrase


def _expression_text(rng: np.random.Generator, attributes: dict[str, str], num_targets: int) -> str:
    """Natural text of a referring expression; plural when it names several objects."""
    plural = num_targets > 1
    determiner = pick(rng, _PLURAL_DETERMINERS) if plural else _SINGULAR_DETERMINER
    return f"{determiner} {_reference(rng, attributes, plural)}"


def _label(targets: Sequence[ObjectSpec]) -> str:
    """Category-style text of the target(s) by appearance, the stage-1 ground-truth label."""
    looks = list(dict.fromkeys(t.look for t in targets))
    if len(targets) == 1:
        return " ".join(looks[0])
    if len(looks) == 1:
        return f"{looks[0][0]} {looks[0][1]}{_PLURAL_SUFFIX}"
    if len({c for c, _ in looks}) == 1:
        return f"{looks[0][0]} {GENERIC_NOUNS[0]}{_PLURAL_SUFFIX}"
    if len({s for _, s in looks}) == 1:
        return f"{looks[0][1]}{_PLURAL_SUFFIX}"
    names = [" ".join(look) for look in looks]
    return _LABEL_SEPARATOR.join(names[:-1]) + _LABEL_LAST_SEPARATOR + names[-1]


def select_expressions(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    specs: Sequence[ObjectSpec],
    ids: Sequence[int],
    candidates: list[tuple[dict[str, str], frozenset[int]]],
) -> list[Expression]:
    """Up to ``expressions_per_type`` per type, preferring distinct target sets."""
    chosen: list[Expression] = []
    for kind in EXPRESSION_TYPES:
        pool = [candidates[i] for i in rng.permutation(len(candidates))]
        pool = [c for c in pool if expression_type_of(c[0]) == kind]
        firsts, seconds, seen = [], [], set()
        for cand in pool:
            (seconds if cand[1] in seen else firsts).append(cand)
            seen.add(cand[1])
        for attributes, targets in (firsts + seconds)[: cfg.expressions_per_type[kind]]:
            order = sorted(targets)
            chosen.append(
                Expression(
                    text=_expression_text(rng, attributes, len(order)),
                    object_ids=[ids[i] for i in order],
                    type=kind,
                    label=_label([specs[i] for i in order]),
                    attributes=dict(attributes),
                )
            )
    return chosen


def _unique_reference(
    specs: Sequence[ObjectSpec], index: int, keys_pool: Sequence[str]
) -> list[dict[str, str]]:
    """Minimal attribute sets from ``keys_pool`` that pick out exactly object ``index``."""
    refs = []
    for size in range(1, len(keys_pool) + 1):
        for keys in itertools.combinations(keys_pool, size):
            attributes = {k: specs[index].get(k) for k in keys}
            if _matches(specs, attributes) == {index} and _is_minimal(specs, attributes, frozenset({index})):
                refs.append(attributes)
    return refs


def _qa_candidates(rng: np.random.Generator, specs: Sequence[ObjectSpec]) -> dict[str, list[QAPair]]:
    """Unambiguous QA pairs of a scene by kind (colour, shape, direction, count)."""
    out: dict[str, list[QAPair]] = {"colour": [], "shape": [], "direction": [], "count": []}
    for i, spec in enumerate(specs):
        for kind, pool in (("colour", (SHAPE, MOTION)), ("shape", (COLOUR, MOTION))):
            refs = _unique_reference(specs, i, pool)
            if refs:
                ref = _reference(rng, refs[int(rng.integers(len(refs)))], plural=False)
                out[kind].append(QAPair(_QUESTIONS[kind].format(ref=ref), spec.get(kind)))
        refs = _unique_reference(specs, i, APPEARANCE_KEYS)
        if refs:
            ref = _noun_phrase(rng, refs[int(rng.integers(len(refs)))], plural=False)
            if spec.motion == STILL:
                out["direction"].append(QAPair(_QUESTIONS["moving"].format(ref=ref), _NO))
            else:
                out["direction"].append(
                    QAPair(_QUESTIONS["direction"].format(ref=ref), MOTION_WORDS[spec.motion])
                )
                out["direction"].append(QAPair(_QUESTIONS["moving"].format(ref=ref), _YES))
    for key in (COLOUR, SHAPE, MOTION):
        for value in dict.fromkeys(s.get(key) for s in specs):
            answer = NUMBER_WORDS[len(_matches(specs, {key: value}))]
            if key == MOTION:
                ref = f"{pick(rng, GENERIC_NOUNS)}{_PLURAL_SUFFIX}"
                template = _QUESTIONS["count_still" if value == STILL else "count_motion"]
                question = template.format(ref=ref, dir=MOTION_WORDS[value])
            else:
                question = _QUESTIONS["count"].format(ref=_noun_phrase(rng, {key: value}, plural=True))
            out["count"].append(QAPair(question, answer))
    return out


def select_qa(rng: np.random.Generator, cfg: SyntheticConfig, specs: Sequence[ObjectSpec]) -> list[QAPair]:
    """Up to ``max_qa`` pairs, cycling over the kinds so a clip asks varied questions."""
    pools = {k: [v[i] for i in rng.permutation(len(v))] for k, v in _qa_candidates(rng, specs).items()}
    kinds = [k for k in (list(pools)[i] for i in rng.permutation(len(pools))) if pools[k]]
    chosen: list[QAPair] = []
    while kinds and len(chosen) < cfg.max_qa:
        for kind in list(kinds):
            if len(chosen) >= cfg.max_qa:
                break
            qa = pools[kind].pop()
            if all(qa.question != c.question for c in chosen):
                chosen.append(qa)
            if not pools[kind]:
                kinds.remove(kind)
    return chosen


def vocabulary(cfg: SyntheticConfig) -> list[str]:
    """Every word the generator can emit in expressions, labels, questions and answers, sorted."""
    texts: list[str] = [
        *cfg.colours,
        *cfg.shapes,
        *(s + _PLURAL_SUFFIX for s in cfg.shapes),
        *GENERIC_NOUNS,
        *(n + _PLURAL_SUFFIX for n in GENERIC_NOUNS),
        *(MOTION_WORDS[m] for m in cfg.motions),
        *NUMBER_WORDS[1 : cfg.max_objects + 1],
        _YES,
        _NO,
        _SINGULAR_DETERMINER,
        *_PLURAL_DETERMINERS,
        _LABEL_SEPARATOR,
        _LABEL_LAST_SEPARATOR,
        *itertools.chain.from_iterable(_STILL_CLAUSES.values()),
        *itertools.chain.from_iterable(_MOVE_CLAUSES.values()),
        *_QUESTIONS.values(),
    ]
    words: set[str] = set()
    for text in texts:
        words.update(split_words(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)
