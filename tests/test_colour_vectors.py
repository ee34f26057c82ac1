"""Colour vectors computed at embed time and carried by the index: a text query ranks the
gallery's crops without reading their images back from the object store."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chatreid.embedder.colour import ColourAttributeMatcher
from chatreid.prefilter import PrefilterStore, VectorMeta
from chatreid.prefilter.follower import _colours
from chatreid.prefilter.metas import MetaTable
from chatreid.prefilter.search import PrefilterSearch
from chatreid.storage import ObjectStore
from schemas import IndexedEvent, SourceOffset
from services.embedder import EmbedderService
from tests.test_pipeline import ingest_synthetic
from tests.test_prefilter_store import DIM, clustered, metas_for

DIM_C = 26


def test_meta_table_keeps_colours_beside_rows_that_have_none() -> None:
    table = MetaTable()
    metas = metas_for(5)
    table.extend(metas[:2])  # an older embedder: no colours
    colours = np.arange(2 * DIM_C, dtype=np.float32).reshape(2, DIM_C)
    table.extend(metas[2:4], colours)
    table.extend(metas[4:])
    got = table.colours(range(5))
    assert got.shape == (5, DIM_C) and table.colour_dim == DIM_C
    assert np.isnan(got[[0, 1, 4]]).all() and np.array_equal(got[2:4], colours)
    assert np.array_equal(table.take(np.array([3, 0])).colours([0])[0], colours[1])
    copy = MetaTable.from_bytes(table.to_bytes())
    assert np.array_equal(copy.colours(range(5)), got, equal_nan=True)
    with pytest.raises(ValueError, match="26"):
        table.extend(metas_for(1, 9), np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("kind", ["flat", "compressed"])
def test_the_store_keeps_colours_through_compaction_and_snapshots(kind: str) -> None:
    x = clustered(3000)
    colours = np.random.default_rng(0).random((3000, DIM_C), dtype=np.float32)
    store = PrefilterStore(DIM, index_kind=kind, exact_max=500)  # type: ignore[arg-type]
    store.add(x, metas_for(3000), colours)
    store.remove([f"crop-{i}" for i in range(1500)])  # compacts
    copy = PrefilterStore.from_bytes(store.to_bytes())
    for s in (store, copy):
        got = s.colours(["crop-2000", "crop-3", "missing"])
        assert np.array_equal(got[0], colours[2000])
        assert np.isnan(got[1:]).all()  # erased, never held
    with pytest.raises(ValueError, match="colour"):
        store.add(clustered(1, seed=1), [VectorMeta("x", "c", "rgb", 0.0)],
                  np.zeros((1, 5), np.float32))
    assert "x" not in store


def event(crop_id: str, colours: np.ndarray | None, version: str | None) -> IndexedEvent:
    return IndexedEvent(
        crop_id=crop_id, vector_id=1, site="s", camera="c", modality="rgb",
        capture_time="2026-12-06T00:00:00Z", object_key=f"crops/{crop_id}.jpg",
        embedder_version="e", dim=2, vector_b64=IndexedEvent.encode_vector(np.ones(2)),
        source=SourceOffset(topic="t", partition=0, offset=0),
        colours_b64=None if colours is None else IndexedEvent.encode_vector(colours),
        colours_version=version)


def test_the_follower_reads_only_the_current_matchers_colours() -> None:
    v = ColourAttributeMatcher.version
    mine = np.linspace(0, 1, DIM_C, dtype=np.float32)
    got = _colours([event("a", mine, v), event("b", None, None),
                    event("c", mine, "colour-attributes-v0"), event("d", mine[:3], v)])
    assert got is not None and np.array_equal(got[0], mine)
    assert np.isnan(got[1:]).all()  # none, another matcher, a wrong length
    assert _colours([event("b", None, None)]) is None  # old events: no colour column at all


@pytest.mark.stack
def test_a_text_query_ranks_indexed_crops_without_reading_them(settings) -> None:
    crops = ingest_synthetic(settings, 40, seed=4)
    assert EmbedderService(settings).run(until_idle_s=3).indexed == 40
    reader = PrefilterSearch(settings)
    assert reader.refresh() == 40
    store = reader.index.active()[1]
    assert store is not None and store.colour_dim == DIM_C
    objects = ObjectStore(settings.s3)
    matcher = ColourAttributeMatcher()
    images = [Image.open(io.BytesIO(objects.get(c.object_key))) for c in crops]
    # exactly what the query path computed from the images before
    assert np.array_equal(store.colours([c.crop_id for c in crops]),
                          matcher.embed_images(images))
    clue = "a person in a red top and blue trousers"
    before = reader.describe(clue, k=10, window=40)
    for c in crops:  # the images are gone: a ranking that read them would change
        objects.delete(c.object_key)
    fresh = PrefilterSearch(settings)
    fresh.refresh()
    after = fresh.describe(clue, k=10, window=40)
    assert [(r.crop_id, r.score) for r in after] == [(r.crop_id, r.score) for r in before]
    assert len({r.score for r in after}) > 1  # a real ranking, not all-equal misses
