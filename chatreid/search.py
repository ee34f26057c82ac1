"""Prefilter-only search over the live index (until the VLM rerank is deployed)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime

from PIL import Image

from .config import Settings
from .prefilter.follower import IndexFollower
from .prefilter.store import Hit, SearchFilter
from .storage import ObjectStore


@dataclass
class SearchResult:
    rank: int
    crop_id: str
    score: float
    camera: str
    modality: str
    capture_time: datetime
    object_key: str


class PrefilterSearch:
    """Builds the store the way every reader does (snapshot + log gap), then answers queries."""

    def __init__(self, settings: Settings, embedder=None) -> None:
        from .embedder import embedder_from_settings

        self.embedder = embedder or embedder_from_settings(settings.embedder)
        self.objects = ObjectStore(settings.s3)
        self.follower = IndexFollower(settings, self.objects,
                                      embedder_version=self.embedder.version)

    def refresh(self, timeout_s: float = 120.0) -> int:
        if self.follower.store is None:
            self.follower.restore()
        self.follower.catch_up(timeout_s)
        return len(self.follower.store) if self.follower.store else 0

    def crop_image(self, crop_id: str) -> Image.Image:
        store = self.follower.store
        meta = store.get_meta(crop_id) if store else None
        if meta is None:
            raise KeyError(f"unknown crop id {crop_id!r}")
        return Image.open(io.BytesIO(self.objects.get(meta.object_key)))

    def search(self, image: Image.Image, k: int = 20, tau: float | None = None,
               filters: SearchFilter | None = None,
               exclude: set[str] | None = None) -> list[SearchResult]:
        store = self.follower.store
        if store is None or len(store) == 0:
            raise LookupError("the gallery is empty: nothing has been indexed yet")
        vec = self.embedder.embed([image])[0]
        extra = len(exclude or ())
        hits: list[Hit] = store.search(vec, k + extra, tau=tau, filters=filters)[0]
        hits = [h for h in hits if not exclude or h.meta.crop_id not in exclude][:k]
        return [
            SearchResult(rank=i + 1, crop_id=h.meta.crop_id, score=h.score, camera=h.meta.camera,
                         modality=h.meta.modality,
                         capture_time=datetime.fromtimestamp(h.meta.capture_time, UTC),
                         object_key=h.meta.object_key)
            for i, h in enumerate(hits)
        ]
