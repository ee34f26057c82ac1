"""The instruction data engine: round trips response -> answer, task mix, Eq. (1), gallery
invariants, determinism and the stage-1 filters, on one tiny synthetic world."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from chatreid.data.instructions import (
    IMAGE_TOKEN,
    STAGE2_MIX,
    CaptionFilter,
    ImageEntry,
    ParseError,
    build_stage1,
    build_stage2,
    build_stage3,
    canonical_attributes,
    load_entries,
    parse_caption,
    parse_stage2,
    parse_stage3,
    sample_num_matches,
)
from chatreid.data.instructions.prompts import CAPTION_PROMPT
from chatreid.data.instructions.stage1 import filter_entries


@pytest.fixture(scope="module")
def stage1(world: Path):
    return build_stage1(world, seed=0, n=200)


@pytest.fixture(scope="module")
def stage2(world: Path):
    return build_stage2(world, seed=0, n=2000)


@pytest.fixture(scope="module")
def stage3(world: Path):
    return build_stage3(world, seed=0, n=600)


def _check_placeholders(samples) -> None:
    for s in samples:
        assert s.prompt.count(IMAGE_TOKEN) == len(s.images) >= 1
        assert all(Path(p).is_file() for p in s.images)


# ----------------------------------------------------------------------------- stage 1


def test_stage1_captions_parse_back_to_their_attributes(stage1) -> None:
    _check_placeholders(stage1)
    assert {s.prompt for s in stage1} == {CAPTION_PROMPT}
    for s in stage1:
        assert parse_caption(s.response) == s.answer
    assert len({s.response for s in stage1}) > len({s.images[0] for s in stage1})  # varied wording


def test_stage1_drops_occluded_small_and_infrared_crops(world: Path, stage1) -> None:
    annotations = json.loads((world / "attributes" / "attributes.json").read_text())
    assert not any(annotations[s.meta["source"]]["attributes"]["occluded"] for s in stage1)
    entries = load_entries(world)
    assert any(e.attributes["occluded"] for e in entries)  # the filter had work to do
    kept = filter_entries(entries, CaptionFilter(min_height=150))
    assert kept and all(e.bbox[3] >= 150 and e.modality == "rgb" for e in kept)
    assert not any(e.attributes["occluded"] for e in kept)


def _entry(bbox=(0, 0, 64, 128), occluded=False, modality="rgb") -> ImageEntry:
    attrs = {"occluded": occluded}
    return ImageEntry("x.jpg", "x.jpg", "ltcc", 1, 1, 0, modality, "train", bbox, attrs, (), ())


def test_caption_filter_on_constructed_entries() -> None:
    flt = CaptionFilter(min_height=100, min_width=40)
    assert flt.keep(_entry())
    assert not flt.keep(_entry(bbox=(0, 0, 64, 90)))  # too short
    assert not flt.keep(_entry(bbox=(0, 0, 30, 128)))  # too narrow
    assert not flt.keep(_entry(occluded=True))
    assert not flt.keep(_entry(modality="infrared"))
    assert CaptionFilter(drop_occluded=False, rgb_only=False).keep(
        _entry(occluded=True, modality="infrared")
    )


def test_stage1_rejects_a_world_with_nothing_left(world: Path) -> None:
    with pytest.raises(ValueError, match="caption filter"):
        build_stage1(world, seed=0, n=1, caption_filter=CaptionFilter(min_height=10_000))


# ----------------------------------------------------------------------------- stage 2


def test_stage2_responses_parse_back(stage2) -> None:
    _check_placeholders(stage2)
    for s in stage2:
        assert parse_stage2(s.task, s.response) == s.answer, s.task
    pairs = [s for s in stage2 if s.task == "ii_one_to_one"]
    assert all((s.meta["pids"][0] == s.meta["pids"][1]) == s.answer["match"] for s in pairs)
    galleries = [s for s in stage2 if s.task == "ii_many_to_many"]
    for s in galleries:
        query, *gallery = s.meta["pids"]
        assert s.answer["indices"] == [i for i, pid in enumerate(gallery, 1) if pid == query]


def test_stage2_task_mix_matches_the_configuration(stage2) -> None:
    counts = Counter(s.task for s in stage2)
    total = sum(STAGE2_MIX.values())
    for task, weight in STAGE2_MIX.items():
        assert abs(counts[task] / len(stage2) - weight / total) < 0.03, task
    image_image = (counts["ii_one_to_one"] + counts["ii_many_to_many"]) / len(stage2)
    assert 0.25 <= image_image <= 0.31


@pytest.mark.parametrize("size", [2, 3, 8, 12])
def test_sample_num_matches_follows_eq1(size: int) -> None:
    rng = np.random.default_rng(7)
    draws = np.array([sample_num_matches(rng, size) for _ in range(20_000)])
    ks = np.arange(2, size + 1)
    assert draws.min() >= 2 and draws.max() <= size
    expected = (1.0 / (ks - 1)) / np.sum(1.0 / np.arange(1, size))  # (1/(k-1)) / H_{N-1}
    observed = np.array([(draws == k).sum() for k in ks])
    if size == 2:
        assert observed.tolist() == [len(draws)]
        return
    chi2 = np.sum((observed - expected * len(draws)) ** 2 / (expected * len(draws)))
    assert chi2 < stats.chi2.ppf(0.999, df=len(ks) - 1)


def test_sample_num_matches_rejects_tiny_galleries() -> None:
    with pytest.raises(ValueError):
        sample_num_matches(np.random.default_rng(0), 1)


# ----------------------------------------------------------------------------- stage 3


def test_stage3_best_choice_invariants(stage3) -> None:
    _check_placeholders(stage3)
    assert set(Counter(s.task for s in stage3)) == {
        "standard", "cloth_changing", "visible_infrared", "text_to_image", "attribute_query",
        "multimodal",
    }  # fmt: skip
    for s in stage3:
        assert parse_stage3(s.response) == s.answer
        query, gallery = s.meta["query"], s.meta["gallery"]
        assert len(s.images) == len(gallery) + s.meta["query_is_image"]
        matches = [i for i, g in enumerate(gallery, 1) if g["pid"] == query["pid"]]
        assert matches == [s.answer["choice"]], s.task
        match = gallery[s.answer["choice"] - 1]
        if s.task == "standard":
            assert match["camid"] != query["camid"]
        if s.task == "cloth_changing":
            assert match["clothes_id"] != query["clothes_id"]
        if s.task == "visible_infrared":
            assert all(g["modality"] != query["modality"] for g in gallery)
    assert len({len(s.meta["gallery"]) for s in stage3}) > 1  # gallery length varies


def test_stage3_attribute_queries_single_out_the_match(world: Path, stage3) -> None:
    annotations = json.loads((world / "attributes" / "attributes.json").read_text())
    queries = [s for s in stage3 if s.task == "attribute_query"]
    assert queries
    for s in queries:
        query = s.meta["attributes"]
        assert 1 <= len(query) <= 3
        for i, path in enumerate(s.images, 1):
            rel = Path(path).relative_to(world).as_posix()
            attrs = canonical_attributes(annotations[rel]["attributes"])
            fits = all(attrs[k] == v for k, v in query.items())
            assert fits == (i == s.answer["choice"])


# ----------------------------------------------------------------------------- shared


@pytest.mark.parametrize("build", [build_stage1, build_stage2, build_stage3])
def test_builders_are_deterministic_by_seed(world: Path, build) -> None:
    first = [s.model_dump() for s in build(world, seed=3, n=40)]
    assert first == [s.model_dump() for s in build(world, seed=3, n=40)]
    assert first != [s.model_dump() for s in build(world, seed=4, n=40)]


def test_malformed_responses_raise() -> None:
    with pytest.raises(ParseError):
        parse_stage3("Image 3, probably.")
    with pytest.raises(ParseError):
        parse_stage2("ii_many_to_many", "All of them.")
    with pytest.raises(ParseError):
        parse_caption("The pedestrian is a man of slim build, roughly 18-30 years old.")
