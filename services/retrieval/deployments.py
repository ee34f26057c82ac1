"""The two back-end deployments: the prefilter index and the VLM rerank. Each is a deployment
of its own because it holds a large, slow-to-build state (the index: snapshot + log replay;
the VLM: a verified checkpoint) and scales apart from the HTTP front (``ingress``).

Kafka and S3 clients are created inside ``__init__`` (they cannot be pickled, and a client
inherited across ``fork`` is dead), so every replica owns its own.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import torch
from cachetools import LRUCache
from PIL import Image
from ray import serve

from chatreid.cluster import unshare
from chatreid.config import Settings
from chatreid.errors import CropGone, ModelUnavailable, UnknownCrop
from chatreid.prefilter.search import PrefilterSearch
from chatreid.prefilter.shards import (
    ShardedIndex,
    ShardedStore,
    ShardUnavailable,
    camera_summary,
    merge_cameras,
)
from chatreid.prefilter.store import PrefilterStore, SearchFilter, VectorMeta
from chatreid.query import (
    ModelSpec,
    RerankAnswer,
    Shortlist,
    VLMRuntime,
    build_shortlist,
    read_crop,
)
from chatreid.query.vlm import resolve_spec
from chatreid.rerank import Candidate, Query, attribute_text
from chatreid.storage import ObjectStore
from schemas import QueryKind, QueryRequest
from services.retrieval.shards import IndexRefresher, ServeShard

log = logging.getLogger("chatreid.serve")


def model_spec(settings: Settings, raw: dict | str | None) -> ModelSpec | None:
    """The rerank ``user_config``'s model: a resolved spec (``chatreid serve``), or a reference
    the replica resolves itself (the portable config: "latest", a base model, a checkpoint
    version). An unknown version raises ValueError, so Serve keeps the previous model."""
    if not raw:
        return None
    if isinstance(raw, dict):
        return ModelSpec.model_validate(raw)
    pinned = settings.model_copy(deep=True)
    pinned.serve.model = raw
    return resolve_spec(pinned)


@serve.deployment(name="Prefilter")
class PrefilterDeployment:
    """The gallery index, and what needs it: shortlists, crop metadata (the crop route's and
    the console's lookups), the console's views of the index (cameras, recent crops, colour
    comparison), and erasure and purge, which apply their tombstones to the index before
    answering. Crop bytes never pass through here: the ingress redirects to the object store.

    Unsharded (``index.shards = 1``) it holds the whole index in memory, and a background
    thread keeps it following the indexed-events topic (and embedder rollouts). Given
    ``shards`` (handles of the ``PrefilterShard<i>`` deployments, ``services.retrieval.shards``)
    it holds none: it embeds the query, fans each search out to every shard and merges.
    """

    def __init__(self, settings: dict | None, *shards) -> None:
        self.settings = unshare(settings)
        self.search = PrefilterSearch(self.settings,
                                      shards=[ServeShard(h) for h in shards] or None)
        try:
            self.search.refresh()
        except ShardUnavailable:  # shards still replaying: the refresh thread retries
            log.info("prefilter shards not all up yet; queries answer 503 until they are")
        self.refresher = IndexRefresher(self.search, self.settings.serve.refresh_every_s)

    def shortlist(self, request: QueryRequest, upload: bytes | None = None) -> Shortlist:
        """``upload``: the query image's bytes, validated by the ingress."""
        return build_shortlist(self.search, request, upload,
                               window=self.settings.serve.text_window)

    # -- the console: cameras, recent crops, attribute comparison, erasure -----------------------
    def cameras(self) -> list[dict]:
        """Per camera: indexed crops, the newest capture time, the modalities seen."""
        store = self.search.index.active()[1]
        if isinstance(store, ShardedStore):
            return store.cameras()
        return merge_cameras([camera_summary(store.live_metas() if store else [])])

    def recent(self, camera: str, limit: int) -> list[VectorMeta]:
        store = self.search.index.active()[1]
        return store.newest(limit, SearchFilter(cameras=frozenset({camera}))) if store else []

    def lookup(self, crop_id: str) -> VectorMeta:
        try:
            return self.search.lookup(crop_id)
        except KeyError:
            raise UnknownCrop(f"crop {crop_id!r} is not in the index") from None

    def _crop_image(self, crop_id: str) -> Image.Image:
        key = self.lookup(crop_id).object_key
        return Image.open(io.BytesIO(read_crop(self.search.objects, key, f"crop {crop_id!r}")))

    def compare(self, crop_id: str, reference: str | None, reference_bytes: bytes | None,
                text: str | None) -> list[dict]:
        """Upper and lower garment colour of the reference (a crop, an upload, or the text
        clue) against the result crop's, as the colour matcher reads them."""
        matcher = self.search.colours.matcher
        candidate = matcher.describe(self._crop_image(crop_id))
        if reference is not None or reference_bytes is not None:
            image = (self._crop_image(reference) if reference is not None
                     else Image.open(io.BytesIO(reference_bytes or b"")))
            ref = matcher.describe(image)
        else:
            ref = matcher.parse(text or "")
        rows = []
        for part in ("upper", "lower"):
            a, b = ref.get(part), candidate.get(part)
            rows.append({"attribute": f"{part} colour", "reference": a, "candidate": b,
                         "agrees": None if a is None or b is None else a == b})
        return rows

    def erase(self, crop_ids: list[str], reason: str, request_id: str) -> dict:
        """Erase crops from storage and every index (a tombstone per crop on the indexed log);
        the index applies the tombstones (every shard) before answering, so the next search
        cannot return them."""
        from chatreid.retention import Eraser

        metas, unknown = [], []
        for crop_id in dict.fromkeys(crop_ids):
            try:
                metas.append(self.search.lookup(crop_id))
            except KeyError:
                unknown.append(crop_id)
        store = self.search.index.active()[1]
        # the live crops matter only for legacy shared keys; a sharded tier loads them then
        live = store.live_metas() if isinstance(store, PrefilterStore) else None
        erased, deleted = Eraser(self.settings, self.search.objects).erase(
            metas, reason, request_id, live=live)
        self._refresh_everywhere()
        return {"erased": erased, "unknown": unknown, "objects_deleted": deleted}

    def purge(self, cutoff: datetime) -> dict:
        """Retention: erase every crop captured before ``cutoff`` (each shard its own)."""
        from chatreid.retention import Eraser

        index = self.search.index
        if isinstance(index, ShardedIndex):
            parts = index.each("purge", cutoff)
            crops, deleted = sum(p[0] for p in parts), sum(p[1] for p in parts)
        else:
            store = index.active()[1]
            crops, deleted = Eraser(self.settings, self.search.objects).purge(
                cutoff, store.live_metas() if store else [])
        self._refresh_everywhere()
        return {"crops_erased": crops, "objects_deleted": deleted}

    def _refresh_everywhere(self) -> None:
        index = self.search.index
        if isinstance(index, ShardedIndex):
            index.each("refresh")
        self.search.refresh(timeout_s=60)

    def status(self) -> dict:
        index = self.search.index
        out = {"gallery": self.search.gallery_size(), "embedder_version": self.search.version,
               "pending_embedder_version": self.search.pending_version,
               **self.refresher.status()}
        if isinstance(index, ShardedIndex):
            return {**out, "shards": index.each("status")}
        return {**out, "index_log": index.stats.log_summary()}

    def check_health(self) -> None:
        self.refresher.check_health()

    def __del__(self) -> None:
        self.refresher.stop()


@serve.deployment(name="Rerank")
class RerankDeployment:
    """Holds one VLM and reranks shortlists with the best-choice dialogue.

    ``reconfigure`` (Serve calls it at start and on every config change, one replica at a time)
    loads the model the config names - a checkpoint is verified file by file - runs the smoke
    query, and only then swaps it in; requests already running finish on the old model.
    """

    def __init__(self, settings: dict | None) -> None:
        self.settings = unshare(settings)
        if self.settings.serve.torch_threads:
            torch.set_num_threads(self.settings.serve.torch_threads)
        self.objects = ObjectStore(self.settings.s3)
        self.runtime: VLMRuntime | None = None
        self._swap = threading.Lock()
        self._pool = ThreadPoolExecutor(self.settings.serve.fetch_workers)
        # object key -> crop; ~100 MB of 128x256 crops
        self._cache: LRUCache[str, Image.Image] = LRUCache(4096)
        self._cache_lock = threading.Lock()  # LRUCache is not thread-safe

    def reconfigure(self, config: dict) -> None:
        spec = model_spec(self.settings, config.get("model"))
        with self._swap:  # Serve serialises reconfigures; this guards against overlap anyway
            if spec is None:
                self.runtime = None
                return
            if self.runtime is not None and self.runtime.version == spec.version:
                return
            t0 = time.perf_counter()
            # CheckpointError: Serve keeps the old one; the new model gets its own vision cache
            runtime = VLMRuntime.load(self.settings, spec, self.objects)
            runtime.smoke()  # SmokeCheckFailed: same
            self.runtime = runtime
            log.info("rerank replica now serves %s (loaded and smoke-checked in %.1fs)",
                     spec.version, time.perf_counter() - t0)

    def version(self) -> str | None:
        runtime = self.runtime
        return runtime.version if runtime else None

    def stats(self) -> dict:
        """This replica: pid, model version, resident and peak memory (for capacity planning)."""
        import os
        import resource

        pages = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1])
        rss = pages * os.sysconf("SC_PAGESIZE")
        cache = self.runtime.vision_cache if self.runtime else None
        vision = None if cache is None else {
            "hits": cache.hits, "shared_hits": cache.shared_hits, "misses": cache.misses,
            "refused": cache.refused, "encoder": cache.version[:12]}
        return {"pid": os.getpid(), "model_version": self.version(), "rss_mb": rss / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "vision_cache": vision}

    def rerank(self, request: QueryRequest, shortlist: Shortlist) -> RerankAnswer:
        runtime = self.runtime  # one model for the whole query, even if a swap lands meanwhile
        if runtime is None:
            raise ModelUnavailable("no VLM is deployed yet: push a checkpoint "
                                   "(chatreid train) or set CHATREID_SERVE__FALLBACK_MODEL")
        keys = [c.object_key for c in shortlist.items]
        if shortlist.kind.has_image and shortlist.query_key:  # a text query shows no image
            keys.append(shortlist.query_key)
        images = dict(zip(keys, self._pool.map(self._image_or_none, keys), strict=True))
        query_image = None
        if shortlist.kind.has_image:
            query_image = (images[shortlist.query_key] if shortlist.query_key
                           else Image.open(io.BytesIO(shortlist.query_bytes or b"")))
            if query_image is None:
                raise CropGone("the image of the query crop is gone (erased or purged)")
        query = Query(shortlist.kind, image=query_image, text=query_text(request))
        # a candidate erased since the shortlist was drawn is left out, not a failed query; its
        # object key names its immutable bytes: the key of its cached ViT output
        candidates = [Candidate(c.crop_id, image, c.score, cache_key=c.object_key)
                      for c in shortlist.items if (image := images[c.object_key]) is not None]
        return runtime.answer(query, candidates, rationale=request.rationale)

    def explain(self, text: str | None, reference: str | None, reference_bytes: bytes | None,
                crop_key: str) -> tuple[str, str]:
        """The VLM's own comparison of the reference and a result (stage 2's attribute
        commonality prompt), or its description of the result for a text-only reference."""
        runtime = self.runtime
        if runtime is None:
            raise ModelUnavailable("no VLM is deployed yet")
        image = None
        if reference is not None:
            image = self._image_or_none(reference)
            if image is None:
                raise CropGone("the reference crop's image is gone (erased or purged)")
        elif reference_bytes is not None:
            image = Image.open(io.BytesIO(reference_bytes)).convert("RGB")
        kind = QueryKind.TEXT_TO_IMAGE if image is None else QueryKind.STANDARD
        query = Query(kind, image=image, text=text)
        result = self._image_or_none(crop_key)
        if result is None:
            raise CropGone("the result crop's image is gone (erased or purged)")
        return runtime.rationale(query, result), runtime.version

    def _image_or_none(self, key: str) -> Image.Image | None:
        """The crop image, None when its object is gone (erased or purged meanwhile)."""
        try:
            return self._image(key)
        except CropGone:
            return None

    def _image(self, key: str) -> Image.Image:
        with self._cache_lock:
            image = self._cache.get(key)  # a hit becomes the most recently used
        if image is None:
            image = Image.open(io.BytesIO(read_crop(self.objects, key, key))).convert("RGB")
            with self._cache_lock:
                self._cache[key] = image  # the least recently used goes past 4096
        return image


def query_text(request: QueryRequest) -> str | None:
    """The text clue: free text, then the attributes in stage 3's ``label: value; ...`` form."""
    parts = [request.text.strip()] if request.text and request.text.strip() else []
    if request.attributes:
        parts.append(attribute_text(request.attributes))
    return "; ".join(parts) or None
