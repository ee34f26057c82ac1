"""The instruction sample model, the annotated image pool a world provides, and shared helpers.

The pool is read from ``<world>/attributes/attributes.json`` (per-image ground truth keyed by the
path relative to the world root) joined with ``identities.json`` (the identity split), so every
builder sees pid, clothes id, camera, modality, captions and attributes of each crop in one place.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

IMAGE_TOKEN = "<image>"
# Instruction data is built from training identities only, never from the evaluation ids.
TRAIN_SPLITS: tuple[str, ...] = ("train", "val")
# The same crop is written into several layouts; this order picks the copy a mixed pool keeps
# (CUHK-PEDES and LTCC keep the native crop size, Market resizes it).
LAYOUT_PREFERENCE: tuple[str, ...] = ("cuhk_pedes", "ltcc", "sysu_mm01", "market1501")


class InstructionSample(BaseModel):
    """One instruction-tuning example; ``answer`` is the machine-readable ground truth."""

    model_config = ConfigDict(frozen=True)

    task: str
    stage: int
    images: list[str]
    prompt: str
    response: str
    answer: dict[str, Any]
    meta: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_placeholder_per_image(self) -> InstructionSample:
        if self.prompt.count(IMAGE_TOKEN) != len(self.images):
            raise ValueError(
                f"{self.task}: {self.prompt.count(IMAGE_TOKEN)} placeholders "
                f"for {len(self.images)} images"
            )
        return self


@dataclass(frozen=True)
class ImageEntry:
    """One annotated crop of the world (a row of ``attributes.json``)."""

    path: str  # absolute path of the image file
    relpath: str  # key in attributes.json
    layout: str  # market1501, ltcc, sysu_mm01 or cuhk_pedes
    pid: int
    clothes_id: int
    camid: int
    modality: str
    split: str  # identity split: train, val or test
    bbox: tuple[int, int, int, int]  # x, y, w, h: the native detection size
    attributes: Mapping[str, Any]
    captions: tuple[str, ...]
    sighting: tuple[Any, ...]  # equal for the copies of one crop in different layouts


def entry_from_annotation(
    root: Path, relpath: str, ann: Mapping[str, Any], split: str
) -> ImageEntry:
    return ImageEntry(
        path=str(root / relpath),
        relpath=relpath,
        layout=relpath.split("/", 1)[0],
        pid=int(ann["person_id"]),
        clothes_id=int(ann["clothes_id"]),
        camid=int(ann["camid"]),
        modality=str(ann["modality"]),
        split=split,
        bbox=tuple(int(v) for v in ann["bbox"]),  # pyright: ignore[reportArgumentType]  (x, y, w, h)
        attributes=ann["attributes"],
        captions=tuple(ann.get("captions", ())),
        sighting=(ann["track_id"], ann["capture_time"], tuple(ann["bbox"])),
    )


def load_entries(world_root: Path, splits: Sequence[str] = TRAIN_SPLITS) -> list[ImageEntry]:
    """Every non-junk crop of identities in ``splits`` (distractors are test-only), sorted."""
    root = Path(world_root)
    annotations = json.loads((root / "attributes" / "attributes.json").read_text())
    identities = json.loads((root / "attributes" / "identities.json").read_text())
    split_of = {int(i["pid"]): str(i["split"]) for i in identities}
    out = []
    for relpath in sorted(annotations):
        ann = annotations[relpath]
        split = split_of.get(int(ann["person_id"]), "")
        if ann.get("junk") or "attributes" not in ann or split not in splits:
            continue
        out.append(entry_from_annotation(root, relpath, ann, split))
    return out


def layout_pool(entries: Iterable[ImageEntry], layout: str) -> list[ImageEntry]:
    return [e for e in entries if e.layout == layout]


def unique_sightings(entries: Iterable[ImageEntry]) -> list[ImageEntry]:
    """One copy per crop, the preferred layout's, so no crop is over-represented."""
    rank = {name: i for i, name in enumerate(LAYOUT_PREFERENCE)}
    best: dict[tuple[Any, ...], ImageEntry] = {}
    for e in entries:
        kept = best.get(e.sighting)
        if kept is None or rank.get(e.layout, 99) < rank.get(kept.layout, 99):
            best[e.sighting] = e
    return sorted(best.values(), key=lambda e: e.relpath)


def by_pid(entries: Iterable[ImageEntry]) -> dict[int, list[ImageEntry]]:
    groups: dict[int, list[ImageEntry]] = defaultdict(list)
    for e in entries:
        groups[e.pid].append(e)
    return dict(groups)


# ----------------------------------------------------------------------------- attributes

ATTRIBUTE_LABELS: dict[str, str] = {
    "gender": "gender",
    "age_range": "age range",
    "build": "build",
    "hair": "hair",
    "upper_type": "upper clothing",
    "upper_colour": "upper clothing colour",
    "upper_pattern": "upper clothing pattern",
    "lower_type": "lower clothing",
    "lower_colour": "lower clothing colour",
    "shoes_colour": "footwear colour",
    "accessories": "accessories",
    "posture": "posture",
}
LABEL_TO_FIELD = {label: key for key, label in ATTRIBUTE_LABELS.items()}


def hair_value(style: str, colour: str) -> str:
    if style == "bald":
        return "bald"
    return f"{style} {colour}" if style in ("short", "long") else f"{colour} {style}"


def accessories_value(colours: Mapping[str, str]) -> str:
    """Sorted by item so the value is canonical; ``none`` when nothing is carried."""
    return " and ".join(f"{colours[item]} {item}" for item in sorted(colours)) or "none"


def canonical_attributes(attrs: Mapping[str, Any]) -> dict[str, str]:
    """The identity-level appearance of a crop as flat strings (viewpoint/occlusion left out)."""
    return {
        "gender": str(attrs["gender"]),
        "age_range": str(attrs["age_range"]),
        "build": str(attrs["build"]),
        "hair": hair_value(str(attrs["hair_style"]), str(attrs["hair_colour"])),
        "upper_type": str(attrs["upper_type"]),
        "upper_colour": str(attrs["upper_colour"]),
        "upper_pattern": str(attrs["upper_pattern"]),
        "lower_type": str(attrs["lower_type"]),
        "lower_colour": str(attrs["lower_colour"]),
        "shoes_colour": str(attrs["shoes_colour"]),
        "accessories": accessories_value(attrs.get("accessory_colours", {})),
        "posture": str(attrs["posture"]),
    }


# Fields a caption or an attribute query can tell apart at a glance.
SALIENT_FIELDS = ("gender", "upper_type", "upper_colour", "lower_type", "lower_colour")


def distinguishable(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """A text negative must differ visibly, else the "wrong" description would also fit."""
    return any(a[k] != b[k] for k in SALIENT_FIELDS)


# ----------------------------------------------------------------------------- sampling helpers


def pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def pick_many(rng: np.random.Generator, items: Sequence[Any], k: int) -> list[Any]:
    """``k`` distinct items in random order."""
    return [items[int(i)] for i in rng.choice(len(items), size=k, replace=False)]


def place(
    rng: np.random.Generator, negatives: list[Any], positives: list[Any]
) -> tuple[list[Any], list[int]]:
    """Shuffle positives into the negatives; returns the list and the 1-based positive indices."""
    items = [(True, p) for p in positives] + [(False, n) for n in negatives]
    order = rng.permutation(len(items))
    shuffled = [items[int(i)] for i in order]
    return [x for _, x in shuffled], [i + 1 for i, (pos, _) in enumerate(shuffled) if pos]


def draw_mixed(
    seed: int,
    builders: Mapping[str, Callable[[np.random.Generator, Any, Any], InstructionSample | None]],
    pools: Any,
    cfg: Any,
    n: int,
    stage: int,
) -> list[InstructionSample]:
    """``n`` samples whose tasks are drawn by the weights in ``cfg.mix``; each task's builder is
    called as ``builder(rng, pools, cfg)`` with ``retry``."""
    mix: Mapping[str, float] = cfg.mix
    unknown = set(mix) - set(builders)
    if unknown:
        raise ValueError(f"unknown stage-{stage} tasks in the mix: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    names = list(mix)
    weights = np.asarray([mix[t] for t in names], dtype=float)
    tasks = rng.choice(len(names), size=n, p=weights / weights.sum())
    return [
        retry(rng, lambda r, b=builders[names[int(t)]]: b(r, pools, cfg),
              f"stage {stage} {names[int(t)]}")
        for t in tasks
    ]


def retry(
    rng: np.random.Generator,
    make: Callable[[np.random.Generator], InstructionSample | None],
    what: str,
    tries: int = 50,
) -> InstructionSample:
    for _ in range(tries):
        sample = make(rng)
        if sample is not None:
            return sample
    raise ValueError(f"{what}: the world has too few suitable images ({tries} draws failed)")
