"""Search over the live index: an image's nearest crops (cosine), a text clue's best colour
matches among the newest crops, or both, inside the store's filters.

Why a layer of its own (below ``chatreid.query.shortlist``, above ``follower`` and ``store``):
it pairs each index with the embedder that wrote it. It follows embedder rollouts like the
embedding service does: it loads each new embedder checkpoint (verified), builds the new
version's index beside the live one (``IndexFollower``), and keeps answering from the live one
until the new index is complete; then store and query embedder switch together, so a query is
never embedded in one space and searched in another. Evaluation, the rollout gate and the CLI
search through it too, without a query request.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
from cachetools import LRUCache
from PIL import Image

from chatreid.config import Settings
from chatreid.metrics.reranking import k_reciprocal_order
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.shards import IndexSwitching, Shard, ShardClient, ShardedIndex
from chatreid.prefilter.store import Hit, SearchFilter, VectorMeta
from chatreid.storage import ObjectStore
from schemas.events import Modality

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    rank: int
    crop_id: str
    # cosine to the query image; for a text query, the colour-attribute match (0..1); None
    # when the clue named no garment colour (newest first)
    score: float | None
    camera: str
    modality: Modality
    capture_time: datetime
    object_key: str


class PrefilterSearch:
    """Builds the store the way every reader does (snapshot + log gap), then answers queries.

    ``follow_checkpoints`` (default: when no ``embedder`` is pinned) serves the rolled-out
    embedder from the ``checkpoints`` topic and moves to newer ones on :meth:`refresh`.
    ``stored_colours=False`` ignores the colour vectors the index holds and reads every
    candidate's image instead (the path before embedders computed them; benchmarks compare).

    Sharded tiers (``index.shards`` > 1, :mod:`.shards`): a shard's search holds one
    ``shard``'s part of the index (and, with ``snapshots``, writes its snapshots); the
    router's is given the ``shards``' clients instead of a follower and searches their union.
    """

    def __init__(self, settings: Settings, embedder=None,
                 follow_checkpoints: bool | None = None, stored_colours: bool = True, *,
                 shard: Shard | None = None, shards: Sequence[ShardClient] | None = None,
                 snapshots: bool = False) -> None:
        from chatreid.embedder import embedder_from_settings
        from chatreid.prefilter.releases import CheckpointWatcher

        def configured():
            return embedder or embedder_from_settings(settings.embedder)

        self.objects = ObjectStore(settings.s3)
        follow = embedder is None if follow_checkpoints is None else follow_checkpoints
        self.watcher = (CheckpointWatcher(settings, objects=self.objects, dead_letters=False)
                        if follow else None)
        if self.watcher is not None:
            current, pending = self.watcher.resolve(configured)
        else:
            current, pending = configured(), None
        self._embedders = {current.version: current}  # the live one, and an incoming one
        self.colours = ColourCache(self.objects, settings.serve.fetch_workers)
        self.stored_colours = stored_colours
        self.serve = settings.serve  # the shortlist order (serve.shortlist_order, k_reciprocal_*)
        # the index searched: this process's follower, or the shards' union (a router)
        self.index: IndexFollower | ShardedIndex = (
            ShardedIndex(shards, settings.index.shard_timeout_s) if shards
            else IndexFollower(settings, self.objects, embedder_version=current.version,
                               shard=shard, snapshots=snapshots))
        if pending is not None:
            self._stage(pending)

    @property
    def embedder(self):
        """The embedder of the version searched now."""
        return self._embedders[self.index.active()[0]]

    @property
    def version(self) -> str:
        return self.embedder.version

    @property
    def pending_version(self) -> str | None:
        return self.index.pending_version

    def _stage(self, release) -> None:
        self._embedders[release.version] = release.embedder
        self.index.prepare(release.version)

    def refresh(self, timeout_s: float = 120.0) -> int:
        """Pick up new embedder checkpoints, apply the log (switching versions when the new
        index is complete); returns the number of searchable crops."""
        if self.watcher is not None:
            release = self.watcher.newest(self.watcher.poll(timeout_ms=200))
            if release is not None and release.version not in self._embedders:
                self._stage(release)
        if self.index.store is None:
            self.index.restore()
        self.index.catch_up(timeout_s)
        live, pending = self.index.active()[0], self.index.pending_version
        self._embedders = {v: e for v, e in self._embedders.items() if v in (live, pending)}
        store = self.index.active()[1]
        return len(store) if store else 0

    def gallery_size(self) -> int:
        store = self.index.active()[1]
        return len(store) if store else 0

    def lookup(self, crop_id: str) -> VectorMeta:
        """The indexed crop's metadata; KeyError when it is not (yet) in the index."""
        store = self.index.active()[1]
        meta = store.get_meta(crop_id) if store else None
        if meta is None:
            raise KeyError(f"unknown crop id {crop_id!r}")
        return meta

    def crop_image(self, crop_id: str) -> Image.Image:
        return Image.open(io.BytesIO(self.objects.get(self.lookup(crop_id).object_key)))

    def browse(self, k: int, filters: SearchFilter | None = None,
               exclude: set[str] | None = None) -> list[SearchResult]:
        """The newest ``k`` indexed crops inside ``filters``: the shortlist of a query without
        an image (the prefilter embedder is image-only; filters are what narrows it)."""
        store = self.index.active()[1]
        if store is None or len(store) == 0:
            raise LookupError("the gallery is empty: nothing has been indexed yet")
        metas = store.newest(k, filters, exclude or frozenset())
        return [_result(i + 1, m, None) for i, m in enumerate(metas)]

    def describe(self, clue: str, k: int = 20, tau: float | None = None,
                 filters: SearchFilter | None = None, exclude: set[str] | None = None,
                 window: int = 1000) -> list[SearchResult]:
        """A text or attribute query's shortlist: the newest ``window`` crops inside
        ``filters`` ranked by the colour-attribute matcher (garment colours the clue names vs
        each crop's colours), newest first among equals; a clue naming no colour leaves the
        newest first. ``tau`` bounds the match share (0..1) when the clue names a colour."""
        recent = self.browse(window, filters, exclude)
        text = self._clue_vector(clue)
        if text is None:
            return recent[:k]
        return self._by_colour(recent, text, k, blend=False, tau=tau)

    def search(self, image: Image.Image, k: int = 20, tau: float | None = None,
               filters: SearchFilter | None = None, exclude: set[str] | None = None,
               clue: str | None = None, pool: int = 100,
               anchors: list[Image.Image] | None = None,
               window: int = 1000) -> list[SearchResult]:
        """The image's top ``k`` by cosine (≥ ``tau``). ``anchors`` (more images of the same
        person, e.g. confirmed sightings) join the query: it searches with the normalised mean
        of all their embeddings.

        With a ``clue`` naming garment colours (a multimodal query: image + text, e.g. "may
        have changed clothes, now in a yellow shirt"), the candidates are the image's cosine
        top ``pool`` and the clue's colour-match top ``pool`` among the newest ``window``
        crops - a changed outfit puts the person outside the image's neighbours - ranked by
        the mean of cosine and colour match, as the evaluation's multimodal prefilter does."""
        version, store = self.index.active()  # embedder and store of the same version
        if store is None or len(store) == 0:
            raise LookupError("the gallery is empty: nothing has been indexed yet")
        embedder = self._embedders.get(version) if version else None
        if embedder is None:  # shards serve a version this router has not loaded yet
            raise IndexSwitching(f"the index serves embedder {version}, which this replica "
                                 "is still loading; retry in a second")
        vecs = embedder.embed([image, *(anchors or [])])
        vec = vecs.mean(axis=0)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        text = self._clue_vector(clue)
        reorder = text is None and self.serve.shortlist_order == "k_reciprocal"
        wanted = (max(k, pool) if text is not None
                  else max(k, self.serve.k_reciprocal_pool) if reorder else k)
        extra = len(exclude or ())
        hits: list[Hit] = store.search(vec, wanted + extra, tau=tau, filters=filters)[0]
        hits = [h for h in hits if not exclude or h.meta.crop_id not in exclude][:wanted]
        results = [_result(i + 1, h.meta, h.score) for i, h in enumerate(hits)]
        if text is None:
            return self._k_reciprocal(store, vec, results, k) if reorder else results
        held = {r.crop_id for r in results}
        described = [r for r in self.describe(clue or "", pool, None, filters, exclude, window)
                     if r.crop_id not in held]
        cosine = store.similarity(vec, [r.crop_id for r in described])
        results += [replace(r, score=float(c)) for r, c in zip(described, cosine, strict=True)
                    if np.isfinite(c) and (tau is None or c >= tau)]
        return self._by_colour(results, text, k, blend=True)

    def _k_reciprocal(self, store, query: np.ndarray, results: list[SearchResult],
                      k: int) -> list[SearchResult]:
        """The cosine top ``results`` re-ordered by k-reciprocal encoding among themselves and
        the query (``chatreid.metrics.k_reciprocal_order``), the first ``k`` kept; scores
        stay cosines. A crop erased since the search drops out."""
        vectors = store.vectors([r.crop_id for r in results])
        held = np.flatnonzero(~np.isnan(vectors).any(axis=1))
        order = held[k_reciprocal_order(query, vectors[held], k1=self.serve.k_reciprocal_k1,
                                        lambda_value=self.serve.k_reciprocal_lambda)][:k]
        return [replace(results[i], rank=n + 1) for n, i in enumerate(order.tolist())]

    def _clue_vector(self, clue: str | None) -> np.ndarray | None:
        """The clue as colour-attribute one-hots; None when it names no garment colour."""
        if not clue:
            return None
        text = self.colours.matcher.embed_texts([clue])
        return text if text.any() else None

    def _by_colour(self, results: list[SearchResult], text: np.ndarray, k: int, blend: bool,
                   tau: float | None = None) -> list[SearchResult]:
        """Re-order by colour match (blended with the cosine for multimodal queries), keep those
        scoring ≥ ``tau``, cap at ``k``; stable, so equal scores keep the incoming order."""
        vectors = self._colour_vectors(results)
        match = self.colours.matcher.match(text, vectors)[0]
        score = [(m + r.score) / 2 if blend else m
                 for m, r in zip(match.tolist(), results, strict=True)]
        order = sorted(range(len(results)), key=lambda i: -score[i])
        if tau is not None:
            order = [i for i in order if score[i] >= tau]
        return [replace(results[i], rank=rank + 1, score=float(score[i]))
                for rank, i in enumerate(order[:k])]

    def _colour_vectors(self, results: list[SearchResult]) -> np.ndarray:
        """Colour vectors from the index (computed at embed time); only crops indexed
        without one (by an older embedder) are read from the object store."""
        store = self.index.active()[1]
        dim = self.colours.matcher.dim
        if store is None or store.colour_dim != dim or not self.stored_colours:
            return self.colours.vectors([(r.crop_id, r.object_key) for r in results])
        vectors = store.colours([r.crop_id for r in results])
        missing = np.flatnonzero(np.isnan(vectors).any(axis=1))
        if len(missing):
            vectors[missing] = self.colours.vectors(
                [(results[i].crop_id, results[i].object_key) for i in missing.tolist()])
        return vectors


class ColourCache:
    """Crops' colour-attribute vectors, computed once per crop from its stored image (fetched
    in parallel) and kept in a bounded LRU map: text queries re-rank the same recent crops."""

    def __init__(self, objects: ObjectStore, workers: int = 8, capacity: int = 200_000) -> None:
        from chatreid.embedder.colour import ColourAttributeMatcher

        self.objects, self.capacity = objects, capacity
        self.matcher = ColourAttributeMatcher()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="colours")
        self._cache: LRUCache[str, np.ndarray] = LRUCache(capacity)  # crop id -> vector
        self._lock = threading.Lock()  # LRUCache is not thread-safe

    def vectors(self, crops: list[tuple[str, str]]) -> np.ndarray:
        """One vector per (crop id, object key), in order."""
        with self._lock:  # reading a cached vector makes it the most recently used
            known = {c: self._cache[c] for c, _ in crops if c in self._cache}
        missing = [(c, k) for c, k in crops if c not in known]
        fresh = dict(zip((c for c, _ in missing),
                         self._pool.map(self._compute, (k for _, k in missing)), strict=True))
        with self._lock:
            self._cache.update((c, v) for c, v in fresh.items() if not np.isnan(v).any())
        # unreadable now (NaN): matches nothing, and is not cached
        out = [known[c] if c in known else np.nan_to_num(fresh[c]) for c, _ in crops]
        return np.stack(out) if out else np.zeros((0, self.matcher.dim), np.float32)

    def _compute(self, key: str) -> np.ndarray:
        """A crop that cannot be read (deleted, unreachable) matches nothing, and is not cached
        as such: the query goes on and the next one tries again."""
        try:
            image = Image.open(io.BytesIO(self.objects.get(key)))
            return self.matcher.embed_images([image])[0]
        except Exception as exc:  # any storage or decode error: one crop, not the query
            log.warning("colour vector of %s unavailable: %s", key, exc)
            return np.full(self.matcher.dim, np.nan, np.float32)


def _result(rank: int, meta: VectorMeta, score: float | None) -> SearchResult:
    return SearchResult(rank=rank, crop_id=meta.crop_id, score=score, camera=meta.camera,
                        modality=meta.modality,
                        capture_time=datetime.fromtimestamp(meta.capture_time, UTC),
                        object_key=meta.object_key)

