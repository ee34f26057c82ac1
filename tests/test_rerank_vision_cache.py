"""Rerank work done once: gallery crops' ViT outputs cached per encoder version (memory, then
object storage) and groups judged together in one padded forward - with the same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chatreid.data.datasets import Market1501
from chatreid.model import build_model
from chatreid.model.vision_cache import Encoded, ObjectStoreTier, VisionCache
from chatreid.rerank import BestChoiceReranker, Candidate, Query, RerankResult

K, GROUP = 12, 4  # a two-level bracket: three leaves and a root


class DictTier:
    """A shared tier in memory (what object storage is to replicas)."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str], bytes] = {}

    def load_many(self, version: str, keys) -> list[bytes | None]:
        return [self.blobs.get((version, k)) for k in keys]

    def save(self, version: str, key: str, data: bytes) -> None:
        self.blobs[(version, key)] = data


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


@pytest.fixture(scope="module")
def market(world: Path) -> Market1501:
    return Market1501(world)


def gallery(market: Market1501) -> list[Candidate]:
    return [Candidate(f"crop-{i}", Image.open(r.path).convert("RGB"), cache_key=r.path.name)
            for i, r in enumerate(market.gallery[:K])]


def query(market: Market1501, i: int) -> Query:
    return Query("standard", image=Image.open(market.query[i].path).convert("RGB"))


def assert_same(a: RerankResult, b: RerankResult) -> None:
    assert [t.chosen for t in a.turns] == [t.chosen for t in b.turns]
    np.testing.assert_allclose([t.probability for t in a.turns],
                               [t.probability for t in b.turns], atol=1e-6)


def test_cached_answers_equal_uncached_and_a_second_query_skips_the_vit(tiny, market) -> None:
    model, processor = tiny
    cands = gallery(market)
    plain = BestChoiceReranker(model, processor, group_size=GROUP, reuse_prefix=False)
    cache = VisionCache(model, image_processor=processor.image_processor)
    cached = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=cache)
    for i in (0, 1):  # the second query shows the same gallery crops
        result = cached.rerank(query(market, i), cands)
        assert_same(result, plain.rerank(query(market, i), cands))
    first, second = cache.misses, cache.hits
    assert (first, second) == (K, K)
    # the second query ran only its own image through the ViT
    assert (result.stats.vision_images, result.stats.vision_cached) == (1, K)


def test_batched_groups_give_the_same_dialogue_in_fewer_forwards(tiny, market) -> None:
    model, processor = tiny
    cands = gallery(market)
    one_by_one = BestChoiceReranker(model, processor, group_size=GROUP, batch_groups=False)
    batched = BestChoiceReranker(model, processor, group_size=GROUP)
    for max_turns in (None, 3):  # the whole dialogue (leaves asked ahead), and a cut one
        a = one_by_one.rerank(query(market, 0), cands, max_turns=max_turns)
        b = batched.rerank(query(market, 0), cands, max_turns=max_turns)
        assert_same(a, b)
        assert b.stats.groups_judged == a.stats.groups_judged  # no question asked in vain
        assert b.stats.group_forwards < a.stats.group_forwards
        assert b.stats.batched_groups > 0


def test_uncached_crops_and_a_small_cache_still_answer_alike(tiny, market) -> None:
    model, processor = tiny
    cands = gallery(market)
    keyless = [Candidate(c.id, c.image) for c in cands]  # no key: encoded every query
    cache = VisionCache(model, capacity=4)
    reranker = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=cache)
    reference = reranker.rerank(query(market, 0), keyless)
    assert reference.stats.vision_cached == 0 and cache.misses == 0
    assert_same(reranker.rerank(query(market, 0), cands), reference)
    assert len(cache._local) == 4  # bounded: the least recently used went
    again = reranker.rerank(query(market, 0), cands)
    assert_same(again, reference)
    assert again.stats.vision_images + again.stats.vision_cached == K + 1


def perturbed(model):
    other, _ = build_model("tiny")
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(0.5)
    return other


def test_another_encoder_never_reuses_entries(tiny, market) -> None:
    model, processor = tiny
    other = perturbed(model)
    tier = DictTier()
    mine = VisionCache(model, tier=tier)
    BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=mine).rerank(
        query(market, 0), gallery(market))
    assert len(tier.blobs) == K
    theirs = VisionCache(other, tier=tier)
    assert theirs.version != mine.version
    assert theirs.lookup_many([c.cache_key for c in gallery(market)]) == [None] * K  # pyright: ignore[reportArgumentType]
    assert theirs.shared_hits == 0
    with pytest.raises(ValueError, match="refusing to mix"):
        BestChoiceReranker(other, processor, group_size=GROUP, vision_cache=mine)


def test_a_wrong_shared_entry_is_refused_and_recomputed(tiny, market) -> None:
    model, processor = tiny
    cands = gallery(market)
    tier = DictTier()
    cache = VisionCache(model, tier=tier)
    key = cands[0].cache_key
    assert key is not None
    # an entry under this encoder's version but of the wrong shape (and one that is not
    # safetensors at all) is never used
    bad = VisionCache(model)
    bad._validate = lambda entry: None  # write what this encoder would never emit
    tier.blobs[(cache.version, key)] = bad._encode(Encoded(torch.zeros(3, 7),
                                                           torch.tensor([1, 2, 2])))
    tier.blobs[(cache.version, cands[1].cache_key or "")] = b"not a tensor file"
    reranker = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=cache)
    result = reranker.rerank(query(market, 0), cands)
    assert cache.refused == 2 and result.stats.vision_cached == 0
    plain = BestChoiceReranker(model, processor, group_size=GROUP, reuse_prefix=False)
    assert_same(result, plain.rerank(query(market, 0), cands))
    fresh = VisionCache(model, tier=tier)  # the recomputed entries replaced the bad ones
    assert all(e is not None for e in fresh.lookup_many([key, cands[1].cache_key or ""]))
    with pytest.raises(ValueError, match="this encoder emits"):
        cache.store("x", Encoded(torch.zeros(3, 7), torch.tensor([1, 2, 2])))


@pytest.mark.stack
def test_object_storage_tier_outlives_a_replica_cache(settings, tiny, market) -> None:
    """A new replica (fresh memory) reuses what another replica wrote to object storage."""
    from chatreid.storage import ObjectStore

    model, processor = tiny
    cands = gallery(market)
    objects = ObjectStore(settings.s3)
    tier = ObjectStoreTier(objects)
    first = VisionCache(model, image_processor=processor.image_processor, tier=tier)
    a = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=first).rerank(
        query(market, 0), cands)
    tier.flush()
    assert len(objects.list(f"vision-cache/{first.version}/")) == K
    fresh = VisionCache(model, image_processor=processor.image_processor,
                        tier=ObjectStoreTier(objects))
    b = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=fresh).rerank(
        query(market, 0), cands)
    assert_same(a, b)
    assert (b.stats.vision_images, b.stats.vision_cached) == (1, K)
    assert (fresh.shared_hits, fresh.misses, fresh.refused) == (K, 0, 0)


class DownTier(DictTier):
    """Object storage refusing every call."""

    def load_many(self, version: str, keys) -> list[bytes | None]:
        raise ConnectionError("object store unreachable")


def test_a_shared_tier_that_is_down_costs_the_cache_not_the_query(tiny, market) -> None:
    model, processor = tiny
    cands = gallery(market)
    cache = VisionCache(model, tier=DownTier())
    reranker = BestChoiceReranker(model, processor, group_size=GROUP, vision_cache=cache)
    plain = BestChoiceReranker(model, processor, group_size=GROUP, reuse_prefix=False)
    assert_same(reranker.rerank(query(market, 0), cands), plain.rerank(query(market, 0), cands))
    assert cache.misses == K  # computed, then kept in memory for the next query
    assert reranker.rerank(query(market, 1), cands).stats.vision_cached == K
