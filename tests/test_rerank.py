"""The best-choice rerank on the tiny model and the tiny synthetic world: prompts per query kind,
the ranking contract, forward-pass counts, and prefix reuse equal to the plain path."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.data.datasets import CUHKPEDES, Market1501
from chatreid.data.instructions import prompts as P
from chatreid.model import build_model
from chatreid.model.prompting import choice_logits, choice_tokens, encode_prompt, index_logits
from chatreid.rerank import (
    BestChoiceReranker,
    Candidate,
    EmptyGalleryError,
    PlainJudge,
    PrefixJudge,
    Query,
    QueryKind,
    best_choice_prompt,
)
from chatreid.rerank.reranker import _rank, stick_breaking

CLUE = "a woman in a red jacket and blue jeans with a black backpack"
TEXTS = {QueryKind.TEXT_TO_IMAGE: CLUE, QueryKind.ATTRIBUTE: "gender: female; upper colour: red"}


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


@pytest.fixture(scope="module")
def crops(world: Path) -> dict[str, list]:
    market = Market1501(world)
    return {
        "query": [Image.open(r.path).convert("RGB") for r in market.query],
        "gallery": [Image.open(r.path).convert("RGB") for r in market.gallery],
        "captions": [c for r in CUHKPEDES(world).gallery for c in r.captions],
    }


def query_for(kind: QueryKind, crops: dict[str, list]) -> Query:
    image = crops["query"][0] if kind.has_image else None
    text = (crops["captions"][0] if crops["captions"] else CLUE) if kind.has_text else None
    if kind is QueryKind.ATTRIBUTE:
        text = TEXTS[kind]
    return Query(kind, image=image, text=text)


def candidates(crops: dict[str, list], k: int) -> list[Candidate]:
    gallery = crops["gallery"]
    assert len(gallery) >= k, "the tiny world's gallery is smaller than the test needs"
    return [Candidate(f"crop-{i}", gallery[i], prefilter_score=1 - i / k) for i in range(k)]


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(QueryKind))
def test_each_kind_builds_a_prompt_with_the_right_images(kind, tiny, crops) -> None:
    _, processor = tiny
    query = query_for(kind, crops)
    prompt = best_choice_prompt(kind, 3, query.text)
    expected = 3 + (1 if kind.has_image else 0)
    assert prompt.images == expected
    images = ([query.image] if query.image else []) + crops["gallery"][:3]
    enc = encode_prompt(processor, prompt.text, images)
    assert enc["image_grid_thw"].shape[0] == expected
    merge = processor.image_processor.merge_size**2
    pads = int((enc["input_ids"] == processor.image_token_id).sum())
    assert pads == int(enc["image_grid_thw"].prod(-1).sum()) // merge


def test_prompts_are_the_stage3_wording() -> None:
    assert best_choice_prompt("standard", 4).text == P.STANDARD_PROMPT.replace(
        "{gallery}", P.gallery_block(4)
    )
    attr = best_choice_prompt("attribute", 2, "hair: long").text
    assert attr == P.ATTRIBUTE_QUERY_PROMPT.replace("{text}", "hair: long").replace(
        "{gallery}", P.gallery_block(2)
    )
    multimodal = best_choice_prompt("multimodal", 3, CLUE)
    assert multimodal.kind is QueryKind.MULTIMODAL and f'"{CLUE}"' in multimodal.head
    assert multimodal.head.startswith(P.MULTIMODAL_PROMPT.partition('"{text}"')[0])  # stage 3's
    stored = best_choice_prompt("adaptive", 3, CLUE)  # the name stored data still uses
    assert stored == multimodal


def test_bad_queries_are_refused(tiny, crops) -> None:
    model, processor = tiny
    with pytest.raises(ValueError, match="unknown query kind 'sketch'"):
        best_choice_prompt("sketch", 3)
    with pytest.raises(ValueError, match="unknown query kind"):
        Query("sketch", image=crops["query"][0])
    with pytest.raises(ValueError, match="needs a query image"):
        Query("standard")
    with pytest.raises(ValueError, match="needs a text"):
        Query("text_to_image", text="  ")
    with pytest.raises(ValueError, match="placeholder"):
        Query("text_to_image", text="like <image>")
    reranker = BestChoiceReranker(model, processor)
    with pytest.raises(EmptyGalleryError):
        reranker.rerank(Query("standard", image=crops["query"][0]), [])
    with pytest.raises(ValueError, match="unique"):
        reranker.rerank(Query("standard", image=crops["query"][0]), candidates(crops, 2) * 2)


# --- ranking contract and forward counts -------------------------------------------------------


@pytest.mark.parametrize("max_turns", [None, 3])
def test_ranking_contract(max_turns, tiny, crops) -> None:
    model, processor = tiny
    cands = candidates(crops, 10)
    reranker = BestChoiceReranker(model, processor, group_size=4, max_turns=max_turns)
    result = reranker.rerank(query_for(QueryKind.STANDARD, crops), cands)
    ranking = result.ranking
    assert sorted(r.candidate_id for r in ranking) == sorted(c.id for c in cands)
    assert [r.rank for r in ranking] == list(range(1, len(cands) + 1))
    turns = len(cands) if max_turns is None else max_turns
    assert [r.reranked for r in ranking] == [True] * turns + [False] * (len(cands) - turns)
    reranked = [r for r in ranking if r.reranked]
    confs = [r.confidence for r in reranked]
    assert all(0.0 < c <= 1.0 for c in confs) and sum(confs) <= 1.0 + 1e-9
    # Ranked by confidence, ties by turn; each is its turn's stick-breaking share.
    assert [(-r.confidence, r.turn) for r in reranked] == sorted(
        (-r.confidence, r.turn) for r in reranked)
    shares = stick_breaking([t.probability for t in result.turns])
    assert [r.confidence for r in reranked] == [shares[r.turn] for r in reranked]
    assert sorted(r.turn for r in reranked) == list(range(turns))
    # Not reranked: prefilter order, no confidence.
    rest = [r for r in ranking if not r.reranked]
    assert [r.prefilter_rank for r in rest] == sorted(r.prefilter_rank for r in rest)
    assert all(r.confidence is None for r in rest)
    # The turns: each chosen once, from what it was shown, the pool shrinking.
    assert [t.chosen for t in result.turns] == [
        r.candidate_id for r in sorted(reranked, key=lambda r: r.turn)]
    assert all(t.chosen in t.shown for t in result.turns)
    assert result.stats.turns == turns and result.stats.candidates == len(cands)


# --- what the confidence means ------------------------------------------------------------------


def preferring_first(certainty: float):
    """A deterministic judge: the candidate shown first (best prefilter rank) gets
    ``certainty``, the rest share what is left equally."""

    def judge(shown):
        n = len(shown)
        return np.array([certainty] + [(1 - certainty) / (n - 1)] * (n - 1))

    return judge


def preferring(order: list[int], temperature: float):
    """A deterministic judge with a fixed taste: softmax of ``-position in order / T``."""
    taste = {c: i for i, c in enumerate(order)}

    def judge(shown):
        logits = np.array([-taste[c] / temperature for c in shown])
        p = np.exp(logits - logits.max())
        return p / p.sum()

    return judge


def dialogue_confidences(tiny, crops, judge, k: int = 10, group_size: int = 4):
    model, processor = tiny
    cands = candidates(crops, k)
    reranker = BestChoiceReranker(model, processor, group_size=group_size)
    turns = reranker._dialogue(judge, cands, None)
    ranking = _rank(cands, turns)
    return turns, [r for r in ranking if r.reranked]


def test_a_certain_judge_puts_its_belief_on_the_first_pick(tiny, crops) -> None:
    turns, ranked = dialogue_confidences(tiny, crops, preferring_first(0.999))
    assert ranked[0].candidate_id == "crop-0" and ranked[0].confidence > 0.99
    assert all(r.confidence < 0.01 for r in ranked[1:])
    assert sum(r.confidence for r in ranked) == pytest.approx(1.0)  # run to the last pick
    assert [r.turn for r in ranked] == list(range(len(turns)))  # falling shares: turn order


def test_an_uncertain_judge_spreads_its_belief(tiny, crops) -> None:
    _, ranked = dialogue_confidences(tiny, crops, preferring(list(range(10)), temperature=50.0))
    confs = [r.confidence for r in ranked]
    assert max(confs) < 0.4  # no pick holds most of the belief (3 bracket winners shown)
    assert sum(c > 0.03 for c in confs) >= 5  # several hold a visible share
    assert len({round(c, 6) for c in confs}) == len(confs)  # not one flat value
    assert sum(confs) <= 1.0 + 1e-9


def test_confidences_differ_where_the_judge_is_more_or_less_sure(tiny, crops) -> None:
    sure = [r.confidence for r in dialogue_confidences(tiny, crops, preferring_first(0.9))[1]]
    unsure = [r.confidence for r in dialogue_confidences(tiny, crops, preferring_first(0.4))[1]]
    assert sure[0] > unsure[0]
    assert sure != pytest.approx(unsure)
    # The same choices with more doubt leave more belief for the later picks.
    assert sum(unsure[1:]) > sum(sure[1:])


def test_a_confident_later_pick_outranks_a_doubtful_earlier_one(tiny, crops) -> None:
    """Ranking by the share, not by turn: a first pick made with 0.3 leaves 0.7 of the belief,
    and a second pick made with 0.9 of it (0.63) ranks above it; equal shares keep turn order."""
    probabilities = iter([0.3, 0.9])

    def judge(shown):
        p = next(probabilities, 0.5)
        return np.array([p] + [(1 - p) / (len(shown) - 1)] * (len(shown) - 1))

    turns, ranked = dialogue_confidences(tiny, crops, judge, k=4, group_size=4)
    assert [t.probability for t in turns] == pytest.approx([0.3, 0.9, 0.5, 1.0])
    assert [r.turn for r in ranked] == [1, 0, 2, 3]  # the last two tie: turn order
    assert [r.confidence for r in ranked] == pytest.approx([0.63, 0.3, 0.035, 0.035])


def test_stick_breaking_shares() -> None:
    assert stick_breaking([]) == []
    assert stick_breaking([0.5, 0.5, 1.0]) == pytest.approx([0.5, 0.25, 0.25])
    assert stick_breaking([1.0, 0.7]) == [1.0, 0.0]  # nothing left after a certain pick
    assert sum(stick_breaking([0.2, 0.3, 0.4])) < 1.0  # dialogue cut short: the rest unranked


def bracket_levels(k: int, g: int) -> list[int]:
    """Entries per bracket level: k candidates, then the groups of each level below."""
    levels = [k]
    while levels[-1] > 1:
        levels.append(math.ceil(levels[-1] / g))
    return levels


def expected_first_turn(k: int, g: int) -> int:
    """Forwards to fill a bracket of balanced groups: one per group with two or more rivals."""
    levels = bracket_levels(k, g)
    return sum(m if n >= 2 * m else n - m for n, m in itertools.pairwise(levels))


@pytest.mark.parametrize("reuse", [True, False])
def test_forward_passes_grow_linearly_with_k(reuse, tiny, crops) -> None:
    model, processor = tiny
    reranker = BestChoiceReranker(model, processor, group_size=4, reuse_prefix=reuse)
    query = query_for(QueryKind.STANDARD, crops)
    counts = {}
    for k in (4, 8, 16):
        stats = reranker.rerank(query, candidates(crops, k)).stats
        depth = len(bracket_levels(k, 4)) - 1
        # The first turn fills the bracket; each later turn re-judges at most the chosen
        # candidate's path, and at least one group while two or more candidates are left.
        assert k - 1 <= stats.groups_judged <= expected_first_turn(k, 4) + depth * (k - 1)
        # groups judged together share a forward (the prefix path batches them)
        assert stats.group_forwards <= stats.groups_judged
        assert stats.prefix_forwards == (1 if reuse else 0)
        if reuse:
            assert stats.vision_images == k + 1  # the query and each crop, once
            # a re-asked group runs only the list after the slot its pick held
            assert 0 < stats.reused_tokens < stats.group_tokens
        else:
            assert stats.reused_tokens == 0
        counts[k] = stats.groups_judged
    # At most two levels here (K <= group_size²): fewer than two forwards per candidate.
    assert all(n < 2 * k for k, n in counts.items()), counts
    one_turn = reranker.rerank(query, candidates(crops, 16), max_turns=1).stats
    assert one_turn.groups_judged == expected_first_turn(16, 4) == 5


def test_prefix_reuse_computes_fewer_decoder_tokens_for_the_same_answer(tiny, crops) -> None:
    """The reuse path's saving is counted: it prefills the query once and runs only each
    group's tokens past what an earlier forward computed - far fewer than the plain path, whose
    every forward runs the whole prompt."""
    model, processor = tiny
    query, cands = query_for(QueryKind.STANDARD, crops), candidates(crops, 12)
    plain, reused = (BestChoiceReranker(model, processor, group_size=4, reuse_prefix=r)
                     .rerank(query, cands) for r in (False, True))
    assert [t.chosen for t in plain.turns] == [t.chosen for t in reused.turns]
    p, r = plain.stats, reused.stats
    assert p.reused_tokens == 0 and p.decoder_tokens > p.group_tokens == 0
    # the prefix once, then the group tokens not reused
    assert r.decoder_tokens < p.decoder_tokens / 2
    assert r.decoder_tokens > r.group_tokens - r.reused_tokens > 0


# --- prefix reuse is exact ---------------------------------------------------------------------


def judges(tiny, query: Query, images: list[Image.Image], g: int):
    model, processor = tiny
    tokens = choice_tokens(processor.tokenizer, g)
    return (
        PlainJudge(model, processor, query, images, tokens),
        PrefixJudge(model, processor, query, images, tokens),
    )


@pytest.mark.parametrize("kind", list(QueryKind))
def test_prefix_reuse_gives_the_plain_probabilities(kind, tiny, crops) -> None:
    images = crops["gallery"][:6]
    plain, reused = judges(tiny, query_for(kind, crops), images, 6)
    for members in ([0, 1, 2, 3, 4, 5], [5, 2], [3, 1, 4]):
        np.testing.assert_allclose(reused(members), plain(members), rtol=0, atol=1e-6)
    assert reused.stats.prefix_forwards == 1
    assert reused.stats.vision_images == len(images) + (1 if kind.has_image else 0)


def test_choice_logits_read_only_the_index_rows_of_the_full_logits(tiny) -> None:
    """The prefix path reads the LM head's index rows alone; the numbers are the full head's."""
    model, processor = tiny
    ids = choice_tokens(processor.tokenizer, 8).index_ids
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(model.config.text_config.hidden_size, generator=gen)
    with torch.no_grad():
        full = index_logits(model.lm_head(hidden), ids)
        np.testing.assert_allclose(choice_logits(model, hidden, ids), full, rtol=0, atol=1e-5)
        assert not np.allclose(choice_logits(model, hidden, ids[::-1]), full)


def test_the_equivalence_check_would_catch_wrong_positions(tiny, crops) -> None:
    """Continuing the suffix at the prefix *length* (not its largest M-RoPE position + 1) is
    the known silent error; the tolerance above must be tight enough to see it."""
    plain, reused = judges(tiny, query_for(QueryKind.STANDARD, crops), crops["gallery"][:4], 4)
    reused.prepare()
    assert reused._next_pos != reused._prefix_len  # the query image makes them differ
    reused._next_pos = reused._prefix_len
    with torch.no_grad():
        diff = np.abs(reused([0, 1, 2, 3]) - plain([0, 1, 2, 3])).max()
    assert diff > 1e-5


def test_rerank_with_and_without_reuse_agree(tiny, crops) -> None:
    model, processor = tiny
    query, cands = query_for(QueryKind.MULTIMODAL, crops), candidates(crops, 9)
    reranker = BestChoiceReranker(model, processor, group_size=4)
    a = reranker.rerank(query, cands, reuse_prefix=True)
    b = reranker.rerank(query, cands, reuse_prefix=False)
    assert [t.chosen for t in a.turns] == [t.chosen for t in b.turns]
    np.testing.assert_allclose(
        [t.probability for t in a.turns], [t.probability for t in b.turns], atol=1e-6
    )
    assert a.stats.groups_judged == b.stats.groups_judged  # the same questions asked
    assert a.stats.group_forwards < b.stats.group_forwards  # in fewer (batched) forwards
    assert a.stats.vision_images < b.stats.vision_images
