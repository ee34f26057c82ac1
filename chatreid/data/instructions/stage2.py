"""Stage 2, fine-grained retrieval: the seven image/text/attribute tasks of Figure 4.

Tasks are drawn per sample from ``STAGE2_MIX``. Pairs and galleries come from the RGB crops of
training identities (one copy per crop); text and attribute tasks use only crops that pass the
stage-1 filter, since their ground truth describes clothing that must be visible. With
``real`` set, the image-image tasks also draw real people (``chatreid.data.instructions.real``);
the text and attribute tasks stay synthetic-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import chatreid.data.instructions.prompts as P
from chatreid.data.instructions.real import RealImages, real_entries, with_real
from chatreid.data.instructions.samples import (
    TRAIN_SPLITS,
    ImageEntry,
    InstructionSample,
    by_pid,
    canonical_attributes,
    distinguishable,
    draw_mixed,
    load_entries,
    pick,
    pick_many,
    place,
    unique_sightings,
)
from chatreid.data.instructions.stage1 import CaptionFilter, filter_entries

# Image-image tasks together 28% of the volume, the other five share the rest equally.
STAGE2_MIX: dict[str, float] = {
    "ii_one_to_one": 0.14,
    "ii_many_to_many": 0.14,
    "ti_one_to_one": 0.144,
    "ti_many_to_one": 0.144,
    "ti_one_to_many": 0.144,
    "attr_common_unique": 0.144,
    "attr_prediction": 0.144,
}


def sample_num_matches(rng: np.random.Generator, n_gallery: int) -> int:
    """Eq. (1): number of matches k in 2..N with P(k) ∝ 1/(k-1), by inverting the CDF.

    Few matches are common and many rare, which keeps the many-to-many task from being solved by
    always answering "all of them".
    """
    if n_gallery < 2:
        raise ValueError(f"a many-to-many gallery needs at least 2 images, got {n_gallery}")
    weights = 1.0 / np.arange(1, n_gallery)  # k - 1 for k = 2..N
    cdf = np.cumsum(weights) / weights.sum()
    k = int(np.searchsorted(cdf, rng.random(), side="right"))
    return 2 + min(k, n_gallery - 2)  # the min guards the last bin against rounding of cdf[-1]


@dataclass(frozen=True)
class Stage2Config:
    mix: dict[str, float] = field(default_factory=lambda: dict(STAGE2_MIX))
    gallery_size: tuple[int, int] = (4, 8)  # many-to-many N ~ Uniform(a, b), inclusive
    n_captions: tuple[int, int] = (2, 4)  # text-image many-to-one
    n_candidates: tuple[int, int] = (2, 5)  # text-image one-to-many
    positive_rate: float = 0.5  # one-to-one tasks
    caption_filter: CaptionFilter = field(default_factory=CaptionFilter)

    def __post_init__(self) -> None:
        if self.gallery_size[0] < 2:
            raise ValueError("a many-to-many gallery needs at least 2 images")
        if self.n_captions[1] > len(P.ORDINALS):
            raise ValueError(f"at most {len(P.ORDINALS)} captions can be named by ordinal")


@dataclass
class _Pools:
    images: list[ImageEntry]  # every RGB crop
    described: list[ImageEntry]  # crops that pass the caption filter and have captions
    pids: dict[int, list[ImageEntry]]


def _between(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _others(pool: list[ImageEntry], e: ImageEntry) -> list[ImageEntry]:
    """Images of other identities that also look different (so text can tell them apart)."""
    ref = canonical_attributes(e.attributes)
    return [
        o
        for o in pool
        if o.pid != e.pid and distinguishable(ref, canonical_attributes(o.attributes))
    ]


def _sample(
    task: str, images: list[ImageEntry], prompt: str, response: str, answer: dict, **meta: object
) -> InstructionSample:
    return InstructionSample(
        task=task,
        stage=2,
        images=[e.path for e in images],
        prompt=prompt,
        response=response,
        answer=answer,
        meta={"pids": [e.pid for e in images], **meta},
    )


# ----------------------------------------------------------------------------- image-image


def ii_one_to_one(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    a = pick(rng, p.images)
    if rng.random() < cfg.positive_rate:
        same = [e for e in p.pids[a.pid] if e is not a]
        cross = [e for e in same if e.camid != a.camid]  # cross-camera pairs are the Re-ID case
        if not same:
            return None
        b, match = pick(rng, cross or same), True
    else:
        others = [e for e in p.images if e.pid != a.pid]
        if not others:
            return None
        b, match = pick(rng, others), False
    response = P.yes_no(
        match, "the two images contain the same pedestrian", "the two images show different people"
    )
    return _sample("ii_one_to_one", [a, b], P.II_ONE_TO_ONE_PROMPT, response, {"match": match})


def ii_many_to_many(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    size = _between(rng, cfg.gallery_size)
    k = sample_num_matches(rng, size)
    # Only identities with k other images (and enough other people) can realise this draw.
    eligible = [
        pid
        for pid, imgs in p.pids.items()
        if len(imgs) > k and len(p.images) - len(imgs) >= size - k
    ]
    if not eligible:
        return None
    query = pick(rng, p.pids[pick(rng, sorted(eligible))])
    positives = pick_many(rng, [e for e in p.pids[query.pid] if e is not query], k)
    negatives = pick_many(rng, [e for e in p.images if e.pid != query.pid], size - k)
    gallery, indices = place(rng, negatives, positives)
    prompt = P.II_MANY_TO_MANY_PROMPT.format(gallery=P.gallery_block(size))
    return _sample(
        "ii_many_to_many",
        [query, *gallery],
        prompt,
        P.many_to_many_response(indices),
        {"indices": indices},
        gallery_size=size,
    )


# ----------------------------------------------------------------------------- text-image


def ti_one_to_one(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    e = pick(rng, p.described)
    match = bool(rng.random() < cfg.positive_rate)
    source = e if match else None
    if not match:
        others = _others(p.described, e)
        if not others:
            return None
        source = pick(rng, others)
    assert source is not None
    prompt = P.TI_ONE_TO_ONE_PROMPT.format(caption=pick(rng, source.captions))
    response = P.yes_no(
        match, "the caption describes the pedestrian", "the caption describes someone else"
    )
    return _sample("ti_one_to_one", [e], prompt, response, {"match": match}, caption_pid=source.pid)


def ti_many_to_one(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    e = pick(rng, p.described)
    others = _others(p.described, e)
    k = _between(rng, cfg.n_captions)
    if len(others) < k - 1:
        return None
    wrong = [pick(rng, o.captions) for o in pick_many(rng, others, k - 1)]
    captions, (choice,) = place(rng, wrong, [pick(rng, e.captions)])
    prompt = P.TI_MANY_TO_ONE_PROMPT.format(captions=P.caption_block(captions))
    return _sample(
        "ti_many_to_one", [e], prompt, P.ordinal_caption_response(choice), {"choice": choice}
    )


def ti_one_to_many(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    e = pick(rng, p.described)
    others = _others(p.described, e)
    k = _between(rng, cfg.n_candidates)
    if len(others) < k - 1:
        return None
    gallery, (choice,) = place(rng, pick_many(rng, others, k - 1), [e])
    prompt = P.TI_ONE_TO_MANY_PROMPT.format(
        caption=pick(rng, e.captions), gallery=P.gallery_block(k)
    )
    return _sample(
        "ti_one_to_many", gallery, prompt, P.description_match_response(choice), {"choice": choice}
    )


# ----------------------------------------------------------------------------- attributes


def attr_common_unique(
    rng: np.random.Generator, p: _Pools, cfg: Stage2Config
) -> InstructionSample | None:
    a = pick(rng, p.described)
    others = [e for e in p.described if e.pid != a.pid]
    if not others:
        return None
    b = pick(rng, others)
    x, y = canonical_attributes(a.attributes), canonical_attributes(b.attributes)
    common = {k: v for k, v in x.items() if y[k] == v}
    first = {k: v for k, v in x.items() if y[k] != v}
    second = {k: y[k] for k in first}
    answer = {"common": common, "unique_first": first, "unique_second": second}
    response = P.common_unique_response(common, first, second)
    return _sample("attr_common_unique", [a, b], P.ATTR_COMMON_UNIQUE_PROMPT, response, answer)


def attr_prediction(rng: np.random.Generator, p: _Pools, cfg: Stage2Config) -> InstructionSample:
    e = pick(rng, p.described)
    attrs = canonical_attributes(e.attributes)
    return _sample(
        "attr_prediction",
        [e],
        P.ATTR_PREDICTION_PROMPT,
        P.attribute_prediction_response(attrs),
        {"attributes": attrs},
    )


Builder = Callable[[np.random.Generator, _Pools, Stage2Config], InstructionSample | None]
BUILDERS: dict[str, Builder] = {
    "ii_one_to_one": ii_one_to_one,
    "ii_many_to_many": ii_many_to_many,
    "ti_one_to_one": ti_one_to_one,
    "ti_many_to_one": ti_many_to_one,
    "ti_one_to_many": ti_one_to_many,
    "attr_common_unique": attr_common_unique,
    "attr_prediction": attr_prediction,
}
PARSERS: dict[str, Callable[[str], dict]] = {
    "ii_one_to_one": P.parse_yes_no,
    "ii_many_to_many": P.parse_many_to_many,
    "ti_one_to_one": P.parse_yes_no,
    "ti_many_to_one": P.parse_ordinal_caption,
    "ti_one_to_many": P.parse_description_match,
    "attr_common_unique": P.parse_common_unique,
    "attr_prediction": P.parse_attribute_prediction,
}


def parse_stage2(task: str, response: str) -> dict:
    return PARSERS[task](response)


def _pools(world_root: Path, splits: tuple[str, ...], cfg: Stage2Config) -> _Pools:
    images = [e for e in unique_sightings(load_entries(world_root, splits)) if e.modality == "rgb"]
    described = [e for e in filter_entries(images, cfg.caption_filter) if e.captions]
    if not images or not described:
        raise ValueError(f"stage 2: {world_root} has no usable RGB crops in splits {splits}")
    return _Pools(images=images, described=described, pids=by_pid(images))


def build_stage2(
    world_root: Path,
    *,
    seed: int,
    n: int,
    config: Stage2Config | None = None,
    splits: tuple[str, ...] = TRAIN_SPLITS,
    real: RealImages | None = None,
) -> list[InstructionSample]:
    cfg = config or Stage2Config()
    pools = _pools(world_root, splits, cfg)
    builders: dict[str, Builder] = BUILDERS
    if real is not None:
        images = real_entries(real)  # identity-only: no captions, so nothing is "described"
        real_pools = _Pools(images=images, described=[], pids=by_pid(images))
        builders = with_real(BUILDERS, 2, real_pools, real.share, real.dataset)
    return draw_mixed(seed, builders, pools, cfg, n, stage=2)
