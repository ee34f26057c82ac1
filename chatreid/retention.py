"""Right to erasure and retention: remove crops from object storage and from every index.

Erasing a crop publishes an ``ErasedEvent`` on the indexed log (keyed by camera, so it lands
after the crop's ``IndexedEvent`` on the same partition) and only once that is durable deletes
the crop's object. Every index follows that log (readers, the snapshot writer, the index of an
embedder being rolled out, any future restart), so each drops the vector and ignores later
index events of the crop; the embedder dead-letters a replayed crop whose object is gone. In
that order a failure never leaves a searchable vector whose image was deleted unannounced, and
erasing again is harmless.

Images: each crop has its own object (``storage.crop_key``), so deleting an erased crop's
object touches no other crop. Crops ingested before that shared content-addressed objects
(``crops/<sha[:2]>/<sha>.<ext>``, one per distinct bytes); such a legacy object is deleted only
when no live crop of the index outside the erased set still names it.

Retention purges every indexed crop captured before a cutoff the same way, plus crop objects
older than the cutoff that no index holds (dead-lettered or never embedded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from chatreid.bus import make_producer, publish
from chatreid.config import Settings
from chatreid.prefilter import PrefilterStore, VectorMeta
from chatreid.prefilter.follower import IndexFollower
from chatreid.storage import CROPS_PREFIX, VISION_CACHE_PREFIX, ObjectStore, legacy_key_sha256
from schemas import INDEXED, ErasedEvent

__all__ = ["RETENTION", "Eraser", "current_index"]

RETENTION = "retention"  # the reason retention purges record
_SEND_TIMEOUT_S = 30.0
_STAT_WORKERS = 8  # parallel existence checks of the objects an erasure deletes


def current_index(settings: Settings, objects: ObjectStore | None = None,
                  timeout_s: float = 120.0) -> PrefilterStore | None:
    """The index as of now (latest snapshot plus the log since), for CLI and batch jobs; None
    when nothing was ever indexed."""
    follower = IndexFollower(settings, objects)
    try:
        follower.restore()
        follower.catch_up(timeout_s)
    finally:
        follower.close()
    return follower.store


class Eraser:
    """Erases crops (``erase``) and applies retention (``purge``)."""

    def __init__(self, settings: Settings, objects: ObjectStore | None = None) -> None:
        self.settings = settings
        self.objects = objects or ObjectStore(settings.s3)
        self.topic = settings.kafka.topic(INDEXED.name)

    def erase(self, metas: Sequence[VectorMeta], reason: str, request_id: str,
              live: Iterable[VectorMeta] | None = None) -> tuple[list[str], int]:
        """Erase these crops from every index, then delete their objects (a missing object is
        fine) except legacy shared ones another live crop still uses. ``live``: the index's
        live crops; None loads the current index, only when a legacy key is involved.
        Returns (erased crop ids, objects deleted)."""
        metas = _unique(metas)
        self._announce(metas, reason, request_id)
        keys = {m.object_key for m in metas if m.object_key}
        if any(legacy_key_sha256(k) for k in keys):
            if live is None:
                index = current_index(self.settings, self.objects)
                live = index.live_metas() if index is not None else []
            erased = {m.crop_id for m in metas}
            keys -= {m.object_key for m in live if m.crop_id not in erased}
        keys = sorted(keys)
        with ThreadPoolExecutor(_STAT_WORKERS) as pool:
            present = [k for k, ok in zip(keys, pool.map(self.objects.exists, keys), strict=True)
                       if ok]
        self.objects.delete_many(present)
        self._forget_features(keys)  # also when the image went first (a retried erasure)
        return [m.crop_id for m in metas], len(present)

    def _drop_orphan_features(self, crops: set[str]) -> None:
        """Delete cached features whose crop object is gone."""
        cached = self.objects.list(f"{VISION_CACHE_PREFIX}/")
        self.objects.delete_many(k for k in cached if k.split("/", 2)[-1] not in crops)

    def _forget_features(self, keys: Sequence[str]) -> None:
        """Delete what was derived from these crop objects: rerank's cached ViT outputs, under
        every encoder version (a missing entry is fine)."""
        if keys:
            versions = self.objects.folders(f"{VISION_CACHE_PREFIX}/")
            self.objects.delete_many(f"{v}{k}" for v in versions for k in keys)

    def purge(self, cutoff: datetime, metas: Sequence[VectorMeta],
              orphans: bool = True) -> tuple[int, int]:
        """Erase every crop of ``metas`` captured before ``cutoff`` (reason "retention") and
        delete crop objects last modified before it that ``metas`` do not hold (``orphans``:
        only when ``metas`` is the whole index - a prefilter shard's are not). A legacy shared
        object a newer crop still names is kept. Returns (crops erased, objects deleted)."""
        if cutoff.tzinfo is None:
            raise ValueError("cutoff must be timezone-aware")
        metas = _unique(metas)
        cut = cutoff.timestamp()
        old = [m for m in metas if m.capture_time < cut]
        kept = {m.object_key for m in metas if m.capture_time >= cut}
        self._announce(old, RETENTION, f"{RETENTION}-{cutoff.isoformat()}")
        stored = dict(self.objects.list_modified(CROPS_PREFIX))
        indexed = {m.object_key for m in metas}
        doomed = {k for k in (m.object_key for m in old) if k in stored and k not in kept}
        if orphans:
            doomed |= {k for k, modified in stored.items()
                       if modified < cutoff and k not in indexed}
        self.objects.delete_many(sorted(doomed))
        if orphans:  # every cached feature whose crop is gone: the doomed ones, and those a
            self._drop_orphan_features(set(stored) - doomed)  # rerank in flight wrote late
        else:
            self._forget_features(sorted(doomed))
        return len(old), len(doomed)

    def _announce(self, metas: Iterable[VectorMeta], reason: str, request_id: str) -> None:
        """Publish one tombstone per crop and wait until every one is durable (acks=all)."""
        metas = list(metas)
        if not metas:
            return
        producer = make_producer(self.settings.kafka)
        try:
            sent = [publish(producer, self.topic, m.camera,
                            ErasedEvent(crop_id=m.crop_id, camera=m.camera, reason=reason,
                                        request_id=request_id)) for m in metas]
            producer.flush(timeout=_SEND_TIMEOUT_S)
            for future in sent:
                future.get(timeout=_SEND_TIMEOUT_S)  # raises if one was not written
        finally:
            producer.close()


def _unique(metas: Sequence[VectorMeta]) -> list[VectorMeta]:
    """One entry per crop id, the first kept."""
    seen: dict[str, VectorMeta] = {}
    for m in metas:
        seen.setdefault(m.crop_id, m)
    return list(seen.values())
