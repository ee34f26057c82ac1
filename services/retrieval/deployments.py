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
from chatreid.prefilter.store import SearchFilter, VectorMeta
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
    """The gallery index, in memory, and what needs it: shortlists, crop metadata (the crop
    route's and the console's lookups), the console's views of the index (cameras, recent
    crops, colour comparison), and erasure and purge, which apply their tombstones to this
    replica's index before answering. A background thread keeps the index following the
    indexed-events topic (and embedder rollouts) so new crops become searchable. Crop bytes
    never pass through here: the ingress redirects to the object store."""

    def __init__(self, settings: dict | None) -> None:
        self.settings = unshare(settings)
        self.search = PrefilterSearch(self.settings)
        self.search.refresh()
        self._last_ok = time.monotonic()
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="index-follow", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        every = self.settings.serve.refresh_every_s
        while not self._stop.wait(every):
            try:
                self.search.refresh(timeout_s=60)
                self._last_ok, self._error = time.monotonic(), None
            except Exception as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                log.exception("prefilter refresh failed; serving the current index")

    def shortlist(self, request: QueryRequest, upload: bytes | None = None) -> Shortlist:
        """``upload``: the query image's bytes, validated by the ingress."""
        return build_shortlist(self.search, request, upload,
                               window=self.settings.serve.text_window)

    # -- the console: cameras, recent crops, attribute comparison, erasure -----------------------
    def cameras(self) -> list[dict]:
        """Per camera: indexed crops, the newest capture time, the modalities seen."""
        store = self.search.follower.active()[1]
        seen: dict[str, dict] = {}
        for meta in store.live_metas() if store else []:
            cam = seen.setdefault(meta.camera, {"camera": meta.camera, "crops": 0,
                                                "last_seen": 0.0, "modalities": set()})
            cam["crops"] += 1
            cam["last_seen"] = max(cam["last_seen"], meta.capture_time)
            cam["modalities"].add(meta.modality)
        return [{**c, "modalities": sorted(c["modalities"])}
                for _, c in sorted(seen.items())]

    def recent(self, camera: str, limit: int) -> list[VectorMeta]:
        store = self.search.follower.active()[1]
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
        this replica applies the tombstones before answering, so its next search cannot
        return them."""
        from chatreid.retention import Eraser

        metas, unknown = [], []
        for crop_id in dict.fromkeys(crop_ids):
            try:
                metas.append(self.search.lookup(crop_id))
            except KeyError:
                unknown.append(crop_id)
        store = self.search.follower.active()[1]
        erased, deleted = Eraser(self.settings, self.search.objects).erase(
            metas, reason, request_id, live=store.live_metas() if store else [])
        self.search.refresh(timeout_s=60)
        return {"erased": erased, "unknown": unknown, "objects_deleted": deleted}

    def purge(self, cutoff: datetime) -> dict:
        """Retention: erase every crop captured before ``cutoff``."""
        from chatreid.retention import Eraser

        store = self.search.follower.active()[1]
        metas = store.live_metas() if store else []
        crops, deleted = Eraser(self.settings, self.search.objects).purge(cutoff, metas)
        self.search.refresh(timeout_s=60)
        return {"crops_erased": crops, "objects_deleted": deleted}

    def status(self) -> dict:
        return {"gallery": self.search.gallery_size(), "embedder_version": self.search.version,
                "pending_embedder_version": self.search.pending_version,
                "last_refresh_s_ago": round(time.monotonic() - self._last_ok, 1),
                "refresh_error": self._error, "index_log": self._log_stats()}

    def _log_stats(self) -> dict:
        """How this replica's index came back: records read from the log since it opened,
        the gap behind its snapshot at resume, partitions replayed from the start."""
        stats = self.search.follower.stats
        return {"read": stats.read, "replay_gap": stats.replay_gap,
                "log_resets": stats.log_resets}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the index-follow thread stopped")
        stale = time.monotonic() - self._last_ok
        if self._error and stale > 300:
            raise RuntimeError(f"index not refreshed for {stale:.0f}s: {self._error}")

    def __del__(self) -> None:
        self._stop.set()


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
            runtime = VLMRuntime.load(self.settings, spec)  # CheckpointError: Serve keeps old
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
        return {"pid": os.getpid(), "model_version": self.version(), "rss_mb": rss / 2**20,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

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
        # a candidate erased since the shortlist was drawn is left out, not a failed query
        candidates = [Candidate(c.crop_id, image, c.score)
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
