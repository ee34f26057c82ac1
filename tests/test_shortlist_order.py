"""serve.shortlist_order: an image query's shortlist as the VLM receives it - the embedder's
cosine top K, or the cosine top ``k_reciprocal_pool`` re-ordered by k-reciprocal encoding
among themselves (scores stay cosines; text-only queries keep their colour order)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chatreid.metrics import k_reciprocal_order
from chatreid.prefilter.search import PrefilterSearch
from chatreid.storage import ObjectStore
from services.embedder import EmbedderService
from tests.test_pipeline import ingest_synthetic


@pytest.mark.stack
def test_the_k_reciprocal_shortlist_reorders_the_cosine_neighbourhood(settings) -> None:
    crops = ingest_synthetic(settings, 60, seed=5)
    assert EmbedderService(settings).run(until_idle_s=3).indexed == 60
    query = Image.open(io.BytesIO(ObjectStore(settings.s3).get(crops[0].object_key)))
    cosine = PrefilterSearch(settings)
    cosine.refresh()
    ordered = settings.model_copy(deep=True)
    ordered.serve.shortlist_order, ordered.serve.k_reciprocal_pool = "k_reciprocal", 30
    live = PrefilterSearch(ordered)
    live.refresh()

    pool = cosine.search(query, k=30, exclude={crops[0].crop_id})
    got = live.search(query, k=10, exclude={crops[0].crop_id})
    # what it must be: the pool's stored vectors, re-ordered for the query's own embedding
    store = cosine.index.active()[1]
    assert store is not None
    vectors = store.vectors([r.crop_id for r in pool])
    q = next(iter(cosine._embedders.values())).embed([query])[0]
    want = [pool[i].crop_id for i in k_reciprocal_order(
        q / np.linalg.norm(q), vectors, k1=ordered.serve.k_reciprocal_k1,
        lambda_value=ordered.serve.k_reciprocal_lambda)[:10]]
    assert [r.crop_id for r in got] == want
    assert [r.rank for r in got] == list(range(1, 11))
    assert [r.crop_id for r in got] != [r.crop_id for r in pool[:10]]  # it did re-order
    by_id = {r.crop_id: r.score for r in pool}  # scores are still the crops' cosines
    assert all(r.score == pytest.approx(by_id[r.crop_id], abs=1e-6) for r in got)
    # a K beyond the pool takes the whole pool, re-ordered; nothing is lost or repeated
    wide = live.search(query, k=40, exclude={crops[0].crop_id})
    assert len({r.crop_id for r in wide}) == len(wide) == 40
