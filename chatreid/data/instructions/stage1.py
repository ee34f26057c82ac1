"""Stage 1, attribute understanding: detailed captions composed from the attribute annotations.

A caption is one sentence per aspect (who, hair, upper and lower clothing, footwear, posture,
accessories). Each aspect has several sentence templates and each value several phrasings; the
seed picks them and the order of the aspects after the first. Every phrasing maps back to exactly
one value, so ``parse_caption`` recovers the canonical attributes the caption was built from.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from chatreid.data.instructions.prompts import CAPTION_PROMPT, ParseError
from chatreid.data.instructions.samples import (
    TRAIN_SPLITS,
    ImageEntry,
    InstructionSample,
    canonical_attributes,
    hair_value,
    load_entries,
    pick,
    unique_sightings,
)
from chatreid.synth.world import (
    AGE_RANGES,
    BUILDS,
    COLOURS,
    HAIR_COLOURS,
    HAIR_STYLES,
    LOWER_TYPES,
    PATTERNS,
    POSTURES,
    UPPER_TYPES,
)

TASK = "caption"


@dataclass(frozen=True)
class CaptionFilter:
    """Which crops are worth describing: big enough, clothing not hidden, colours visible."""

    min_height: int = 96  # native detection size (bbox), not the resized file
    min_width: int = 32
    drop_occluded: bool = True
    rgb_only: bool = True  # infrared crops show no colours, so a colour caption would lie

    def keep(self, e: ImageEntry) -> bool:
        _, _, w, h = e.bbox
        if h < self.min_height or w < self.min_width:
            return False
        if self.drop_occluded and e.attributes.get("occluded", False):
            return False  # every synthetic occluder covers part of the clothing
        return not (self.rgb_only and e.modality != "rgb")


def filter_entries(entries: Iterable[ImageEntry], flt: CaptionFilter) -> list[ImageEntry]:
    return [e for e in entries if flt.keep(e)]


# ----------------------------------------------------------------------------- phrasings

_COLOUR_WORDS = {"grey": ("grey", "gray"), "navy": ("navy", "dark blue")}
_GENDER = {"male": ("man", "male"), "female": ("woman", "female")}
_BUILD = {
    "slim": ("slim", "slender"),
    "average": ("average", "medium"),
    "heavy": ("heavy", "stocky"),
}
_UPPER = {
    "t-shirt": ("t-shirt", "tee"),
    "shirt": ("shirt", "button-up shirt"),
    "jacket": ("jacket", "zip-up jacket"),
    "hoodie": ("hoodie", "hooded sweatshirt"),
    "coat": ("coat", "long coat"),
}
_LOWER = {
    "trousers": ("trousers", "pants"),
    "jeans": ("jeans", "denim jeans"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
}
_POSTURE = {
    "upright": ("an upright posture", "an upright gait"),
    "slouched": ("a slouched posture", "a slight stoop"),
    "leaning": ("a forward-leaning posture", "a leaning gait"),
}
_ITEMS = {"backpack": "backpack", "bag": "shoulder bag", "hat": "hat", "glasses": "glasses"}


def _an(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _colour_words(colour: str) -> tuple[str, ...]:
    return _COLOUR_WORDS.get(colour, (colour,))


def _hair_phrases(value: str) -> list[str]:
    if value == "bald":
        return ["a bald head", "a shaved head"]
    first, second = value.split(" ", 1)
    if first in ("short", "long"):
        return [f"{first} {c} hair" for c in _colour_words(second)]
    return [f"{c} hair in a {second}" for c in _colour_words(first)]


def _upper_phrases(kind: str, colour: str, pattern: str) -> list[str]:
    out = []
    for c, k in itertools.product(_colour_words(colour), _UPPER[kind]):
        if pattern == "solid":
            out.append(_an(f"{c} {k}"))
        elif pattern == "logo":
            out.append(_an(f"{c} {k} with a logo"))
        else:
            out.append(_an(f"{c} {pattern} {k}"))
    return out


def _lower_phrases(kind: str, colour: str) -> list[str]:
    return [f"{c} {k}" for c, k in itertools.product(_colour_words(colour), _LOWER[kind])]


def _item_phrases(item: str, colour: str) -> list[str]:
    name = _ITEMS[item]
    return [
        f"{c} {name}" if item == "glasses" else _an(f"{c} {name}") for c in _colour_words(colour)
    ]


# Slot name -> {canonical value(s): phrasings}. Built once; a phrasing is never shared.
@cache
def _slots() -> dict[str, dict[tuple[str, ...], list[str]]]:
    hair_values = {hair_value(s, c) for s in HAIR_STYLES for c in HAIR_COLOURS}
    slots: dict[str, dict[tuple[str, ...], list[str]]] = {
        "gender": {(g,): list(w) for g, w in _GENDER.items()},
        "age_range": {(a,): [a] for a in AGE_RANGES.values()},
        "build": {(b,): list(_BUILD[b]) for b in BUILDS},
        "hair": {(h,): _hair_phrases(h) for h in sorted(hair_values)},
        "upper": {
            (k, c, p): _upper_phrases(k, c, p)
            for k in UPPER_TYPES
            for c in COLOURS
            for p in PATTERNS
        },
        "lower": {(k, c): _lower_phrases(k, c) for k in LOWER_TYPES for c in COLOURS},
        "shoes": {(c,): list(_colour_words(c)) for c in COLOURS},
        "posture": {(p,): list(_POSTURE[p]) for p in POSTURES},
        "item": {(i, c): _item_phrases(i, c) for i in _ITEMS for c in COLOURS},
    }
    return slots


@cache
def _reverse(slot: str) -> dict[str, tuple[str, ...]]:
    rev: dict[str, tuple[str, ...]] = {}
    for value, phrases in _slots()[slot].items():
        for phrase in phrases:
            if rev.setdefault(phrase, value) != value:
                raise AssertionError(f"ambiguous {slot} phrasing {phrase!r}")
    return rev


# Slot fields of the canonical attribute dict.
_SLOT_FIELDS = {
    "gender": ("gender",),
    "age_range": ("age_range",),
    "build": ("build",),
    "hair": ("hair",),
    "upper": ("upper_type", "upper_colour", "upper_pattern"),
    "lower": ("lower_type", "lower_colour"),
    "shoes": ("shoes_colour",),
    "posture": ("posture",),
}

# Aspect -> sentence templates. {Pr}/{pr}: he/she, {Pos}/{pos}: his/her, {slot}: a phrasing.
_ASPECTS: dict[str, tuple[str, ...]] = {
    "who": (
        "The pedestrian is a {gender} of {build} build, roughly {age_range} years old.",
        "This {gender} appears to be about {age_range} years old and is of {build} build.",
        "The image shows a {gender} in the {age_range} age range, of {build} build.",
    ),
    "hair": ("{Pr} has {hair}.", "{Pr} is seen with {hair}."),
    "upper": (
        "{Pr} wears {upper} on the upper body.",
        "On top, {pr} is wearing {upper}.",
        "{Pos} upper clothing is {upper}.",
    ),
    "lower": (
        "{Pr} has on {lower}.",
        "Below the waist, {pr} wears {lower}.",
        "{Pos} lower clothing is {lower}.",
    ),
    "shoes": (
        "{Pr} wears {shoes} shoes.",
        "{Pos} footwear is a pair of {shoes} shoes.",
        "On {pos} feet are {shoes} shoes.",
    ),
    "posture": ("{Pr} walks with {posture}.", "{Pos} gait shows {posture}."),
    "accessories": (
        "As accessories, {pr} has {items}.",
        "Noticeable accessories: {items}.",
        "{Pr} carries no visible accessories.",
    ),
}
_NO_ACCESSORIES = 2  # index of the template used when nothing is carried
_PRONOUNS = {"Pr": ("He", "She"), "pr": ("he", "she"), "Pos": ("His", "Her"), "pos": ("his", "her")}


def _phrase(rng: np.random.Generator, slot: str, value: tuple[str, ...]) -> str:
    return pick(rng, _slots()[slot][value])


def _slot_values(attrs: dict[str, str]) -> dict[str, tuple[str, ...]]:
    return {slot: tuple(attrs[f] for f in fields) for slot, fields in _SLOT_FIELDS.items()}


def _items(accessories: str) -> list[tuple[str, str]]:
    """``"red backpack and black glasses"`` -> ``[("backpack", "red"), ("glasses", "black")]``."""
    if accessories == "none":
        return []
    return [(p.rsplit(" ", 1)[1], p.rsplit(" ", 1)[0]) for p in accessories.split(" and ")]


def _sentence(rng: np.random.Generator, aspect: str, attrs: dict[str, str]) -> str:
    templates = _ASPECTS[aspect]
    if aspect == "accessories":
        items = _items(attrs["accessories"])
        if not items:
            template = templates[_NO_ACCESSORIES]
        else:
            template = pick(rng, templates[:_NO_ACCESSORIES])
        phrases = [_phrase(rng, "item", v) for v in items]
        rng.shuffle(phrases)  # type: ignore[arg-type]
        fills = {"items": _join(phrases)}
    else:
        template = pick(rng, templates)
        values = _slot_values(attrs)
        fills = {s: _phrase(rng, s, values[s]) for s in values if "{" + s + "}" in template}
    female = attrs["gender"] == "female"
    pronouns = {k: v[int(female)] for k, v in _PRONOUNS.items()}
    return template.format(**pronouns, **fills)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def compose_caption(rng: np.random.Generator, attrs: dict[str, str]) -> str:
    """Who-sentence first (it introduces the pronoun), the other aspects in a random order."""
    rest = [a for a in _ASPECTS if a != "who"]
    order = ["who", *(rest[int(i)] for i in rng.permutation(len(rest)))]
    return " ".join(_sentence(rng, a, attrs) for a in order)


# ----------------------------------------------------------------------------- parsing


@cache
def _patterns() -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for aspect, templates in _ASPECTS.items():
        for t in templates:
            rx = re.escape(t)
            for k in _PRONOUNS:
                rx = rx.replace(re.escape("{" + k + "}"), f"(?:{'|'.join(_PRONOUNS[k])})")
            rx = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", rx)
            out.append((aspect, re.compile(rx)))
    return out


def _lookup(slot: str, phrase: str) -> tuple[str, ...]:
    try:
        return _reverse(slot)[phrase]
    except KeyError:
        raise ParseError(f"unknown {slot} phrasing {phrase!r}") from None


def _fields(aspect: str, m: re.Match[str]) -> dict[str, str]:
    if aspect == "accessories":
        phrases = re.split(r", | and ", m.group("items")) if "items" in m.groupdict() else []
        items = sorted(_lookup("item", p) for p in phrases)
        return {"accessories": " and ".join(f"{c} {i}" for i, c in items) or "none"}
    fields: dict[str, str] = {}
    for slot, phrase in m.groupdict().items():
        fields.update(zip(_SLOT_FIELDS[slot], _lookup(slot, phrase), strict=True))
    return fields


def _parse_sentence(sentence: str) -> tuple[str, dict[str, str]]:
    """The one template reading whose phrasings are all known ("has {hair}" also matches
    "has on {lower}", but "on blue jeans" is no hair phrasing)."""
    readings = []
    for aspect, rx in _patterns():
        m = rx.fullmatch(sentence)
        if m is not None:
            try:
                readings.append((aspect, _fields(aspect, m)))
            except ParseError:
                continue
    if len(readings) != 1:
        raise ParseError(f"{len(readings)} readings of caption sentence {sentence!r}")
    return readings[0]


def parse_caption(response: str) -> dict[str, dict[str, str]]:
    """Caption -> ``{"attributes": canonical attributes}``; every aspect must appear once."""
    seen: dict[str, dict[str, str]] = {}
    for sentence in re.split(r"(?<=\.) ", response.strip()):
        aspect, fields = _parse_sentence(sentence)
        if aspect in seen:
            raise ParseError(f"aspect {aspect!r} described twice")
        seen[aspect] = fields
    if set(seen) != set(_ASPECTS):
        raise ParseError(f"missing aspects {sorted(set(_ASPECTS) - set(seen))}")
    attrs = {k: v for fields in seen.values() for k, v in fields.items()}
    return {"attributes": attrs}


# ----------------------------------------------------------------------------- builder


def caption_sample(rng: np.random.Generator, entry: ImageEntry) -> InstructionSample:
    attrs = canonical_attributes(entry.attributes)
    return InstructionSample(
        task=TASK,
        stage=1,
        images=[entry.path],
        prompt=CAPTION_PROMPT,
        response=compose_caption(rng, attrs),
        answer={"attributes": attrs},
        meta={"pid": entry.pid, "source": entry.relpath},
    )


def build_stage1(
    world_root: Path,
    *,
    seed: int,
    n: int,
    caption_filter: CaptionFilter | None = None,
    splits: tuple[str, ...] = TRAIN_SPLITS,
) -> list[InstructionSample]:
    """``n`` captioning samples over the filtered crops (each crop once before any repeats)."""
    rng = np.random.default_rng(seed)
    pool = filter_entries(
        unique_sightings(load_entries(world_root, splits)), caption_filter or CaptionFilter()
    )
    if not pool:
        raise ValueError(f"stage 1: no crop of {world_root} passes the caption filter")
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])
    return [caption_sample(rng, pool[int(i)]) for i in order[:n]]
