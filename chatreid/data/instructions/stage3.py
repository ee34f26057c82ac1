"""Stage 3, Re-ID reasoning in best-choice form: a query (image, text, attributes or both) and a
gallery of 3-8 candidates holding exactly one true match, so the best choice is unambiguous.

Each task draws from the layout it stands for: standard Re-ID from Market-1501, cloth-changing
from LTCC (the match wears another outfit), visible-infrared from SYSU-MM01 (the gallery is of the
other modality), text and attribute queries from the CUHK-PEDES crops with their captions.
With ``real`` set, standard Re-ID also draws real people (``chatreid.data.instructions.real``);
the other tasks stay synthetic-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import chatreid.data.instructions.prompts as P
from chatreid.data.instructions.real import RealImages, real_entries, with_real
from chatreid.data.instructions.samples import (
    ATTRIBUTE_LABELS,
    TRAIN_SPLITS,
    ImageEntry,
    InstructionSample,
    by_pid,
    canonical_attributes,
    distinguishable,
    draw_mixed,
    layout_pool,
    load_entries,
    pick,
    pick_many,
    place,
)
from chatreid.data.instructions.stage1 import CaptionFilter, filter_entries

STAGE3_MIX: dict[str, float] = {
    "standard": 1 / 6,
    "cloth_changing": 1 / 6,
    "visible_infrared": 1 / 6,
    "text_to_image": 1 / 6,
    "attribute_query": 1 / 6,
    "multimodal": 1 / 6,
}
# Attributes a partial query may name (the identity-level look; posture/build are too subtle).
QUERY_FIELDS = (
    "gender",
    "hair",
    "upper_type",
    "upper_colour",
    "upper_pattern",
    "lower_type",
    "lower_colour",
    "shoes_colour",
    "accessories",
)


@dataclass(frozen=True)
class Stage3Config:
    mix: dict[str, float] = field(default_factory=lambda: dict(STAGE3_MIX))
    gallery_size: tuple[int, int] = (3, 8)  # inclusive; one match, the rest negatives
    query_attributes: tuple[int, int] = (1, 3)
    caption_filter: CaptionFilter = field(default_factory=CaptionFilter)


@dataclass
class _Pools:
    layouts: dict[str, list[ImageEntry]]
    described: list[ImageEntry]  # CUHK-PEDES crops with captions that pass the caption filter
    ltcc_described: list[ImageEntry]


def _gallery(
    rng: np.random.Generator, cfg: Stage3Config, match: ImageEntry, negatives: list[ImageEntry]
) -> tuple[list[ImageEntry], int] | None:
    size = int(rng.integers(cfg.gallery_size[0], cfg.gallery_size[1] + 1))
    if len(negatives) < size - 1:
        return None
    gallery, (choice,) = place(rng, pick_many(rng, negatives, size - 1), [match])
    return gallery, choice


def _sample(
    task: str,
    query: ImageEntry | None,
    gallery: list[ImageEntry],
    choice: int,
    prompt: str,
    reference: ImageEntry,
    **meta: object,
) -> InstructionSample:
    images = ([query] if query else []) + gallery
    return InstructionSample(
        task=task,
        stage=3,
        images=[e.path for e in images],
        prompt=prompt.replace("{gallery}", P.gallery_block(len(gallery))),
        response=P.best_match_response(choice),
        answer={"choice": choice},
        meta={
            "query": _describe(reference),
            "gallery": [_describe(e) for e in gallery],
            "query_is_image": query is not None,
            **meta,
        },
    )


def _describe(e: ImageEntry) -> dict[str, object]:
    return {"pid": e.pid, "clothes_id": e.clothes_id, "modality": e.modality, "camid": e.camid}


def _image_query(
    task: str,
    prompt: str,
    rng: np.random.Generator,
    pool: list[ImageEntry],
    cfg: Stage3Config,
    is_match: Callable[[ImageEntry, ImageEntry], bool],
    is_candidate: Callable[[ImageEntry, ImageEntry], bool],
) -> InstructionSample | None:
    """Query image, one match (``is_match``), negatives of other people (``is_candidate``)."""
    query = pick(rng, pool)
    matches = [e for e in by_pid(pool)[query.pid] if e is not query and is_match(query, e)]
    if not matches:
        return None
    negatives = [e for e in pool if e.pid != query.pid and is_candidate(query, e)]
    drawn = _gallery(rng, cfg, pick(rng, matches), negatives)
    if drawn is None:
        return None
    gallery, choice = drawn
    return _sample(task, query, gallery, choice, prompt, query)


def standard(rng: np.random.Generator, p: _Pools, cfg: Stage3Config) -> InstructionSample | None:
    return _image_query(
        "standard",
        P.STANDARD_PROMPT,
        rng,
        p.layouts["market1501"],
        cfg,
        is_match=lambda q, e: e.camid != q.camid,  # Re-ID matches are cross-camera
        is_candidate=lambda q, e: True,
    )


def cloth_changing(
    rng: np.random.Generator, p: _Pools, cfg: Stage3Config
) -> InstructionSample | None:
    return _image_query(
        "cloth_changing",
        P.CLOTH_CHANGING_PROMPT,
        rng,
        p.layouts["ltcc"],
        cfg,
        is_match=lambda q, e: e.clothes_id != q.clothes_id,
        is_candidate=lambda q, e: True,
    )


def visible_infrared(
    rng: np.random.Generator, p: _Pools, cfg: Stage3Config
) -> InstructionSample | None:
    return _image_query(
        "visible_infrared",
        P.VISIBLE_INFRARED_PROMPT,
        rng,
        p.layouts["sysu_mm01"],
        cfg,
        is_match=lambda q, e: e.modality != q.modality,
        is_candidate=lambda q, e: e.modality != q.modality,  # a one-modality gallery
    )


def _looks_different(pool: list[ImageEntry], ref: ImageEntry) -> list[ImageEntry]:
    attrs = canonical_attributes(ref.attributes)
    return [
        e
        for e in pool
        if e.pid != ref.pid and distinguishable(attrs, canonical_attributes(e.attributes))
    ]


def text_to_image(
    rng: np.random.Generator, p: _Pools, cfg: Stage3Config
) -> InstructionSample | None:
    target = pick(rng, p.described)
    drawn = _gallery(rng, cfg, target, _looks_different(p.described, target))
    if drawn is None:
        return None
    gallery, choice = drawn
    caption = pick(rng, target.captions)
    prompt = P.TEXT_TO_IMAGE_PROMPT.replace("{text}", caption)
    return _sample("text_to_image", None, gallery, choice, prompt, target, clue=caption)


def attribute_query(
    rng: np.random.Generator, p: _Pools, cfg: Stage3Config
) -> InstructionSample | None:
    target = pick(rng, p.described)
    attrs = canonical_attributes(target.attributes)
    k = int(rng.integers(cfg.query_attributes[0], cfg.query_attributes[1] + 1))
    fields = sorted(pick_many(rng, QUERY_FIELDS, k), key=list(ATTRIBUTE_LABELS).index)
    query = {f: attrs[f] for f in fields}
    # Negatives must contradict the query (anyone who satisfies it would be a second match) and
    # be other people (the target in another outfit would be a match by identity).
    negatives = [
        e
        for e in p.described
        if e.pid != target.pid
        and any(canonical_attributes(e.attributes)[f] != v for f, v in query.items())
    ]
    drawn = _gallery(rng, cfg, target, negatives)
    if drawn is None:
        return None
    gallery, choice = drawn
    clue = P.attribute_list(query)
    prompt = P.ATTRIBUTE_QUERY_PROMPT.replace("{text}", clue)
    return _sample("attribute_query", None, gallery, choice, prompt, target, attributes=query,
                   clue=clue)


def multimodal(rng: np.random.Generator, p: _Pools, cfg: Stage3Config) -> InstructionSample | None:
    """Image + text clue: the image gives the person, the text their look in the gallery (LTCC,
    so the clue often describes a different outfit than the query wears)."""
    query = pick(rng, p.layouts["ltcc"])
    matches = [e for e in p.ltcc_described if e.pid == query.pid and e.sighting != query.sighting]
    if not matches:
        return None
    changed = [e for e in matches if e.clothes_id != query.clothes_id]
    match = pick(rng, changed or matches)
    drawn = _gallery(rng, cfg, match, _looks_different(p.ltcc_described, match))
    if drawn is None:
        return None
    gallery, choice = drawn
    caption = pick(rng, match.captions)
    prompt = P.MULTIMODAL_PROMPT.replace("{text}", caption)
    return _sample("multimodal", query, gallery, choice, prompt, query, clue=caption)


BUILDERS: dict[
    str, Callable[[np.random.Generator, _Pools, Stage3Config], InstructionSample | None]
] = {
    "standard": standard,
    "cloth_changing": cloth_changing,
    "visible_infrared": visible_infrared,
    "text_to_image": text_to_image,
    "attribute_query": attribute_query,
    "multimodal": multimodal,
}


def parse_stage3(response: str) -> dict[str, int]:
    """Every stage-3 task answers in the same best-choice form."""
    return P.parse_best_match(response)


def _pools(world_root: Path, splits: tuple[str, ...], cfg: Stage3Config) -> _Pools:
    entries = load_entries(world_root, splits)
    layouts = {
        name: layout_pool(entries, name)
        for name in ("market1501", "ltcc", "sysu_mm01", "cuhk_pedes")
    }

    def described(pool: list[ImageEntry]) -> list[ImageEntry]:
        return [e for e in filter_entries(pool, cfg.caption_filter) if e.captions]

    return _Pools(layouts, described(layouts["cuhk_pedes"]), described(layouts["ltcc"]))


def build_stage3(
    world_root: Path,
    *,
    seed: int,
    n: int,
    config: Stage3Config | None = None,
    splits: tuple[str, ...] = TRAIN_SPLITS,
    real: RealImages | None = None,
) -> list[InstructionSample]:
    cfg = config or Stage3Config()
    pools = _pools(world_root, splits, cfg)
    builders = BUILDERS
    if real is not None:
        # Standard Re-ID reads its pool from the "market1501" slot; real people fill it.
        real_pools = _Pools({"market1501": real_entries(real)}, [], [])
        builders = with_real(BUILDERS, 3, real_pools, real.share, real.dataset)
    return draw_mixed(seed, builders, pools, cfg, n, stage=3)
