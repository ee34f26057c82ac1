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

CLI and batch jobs read a sharded index one shard's part at a time (``index_parts``), so a site
of 100M crops never needs the whole index in one process's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from chatreid.bus import make_producer, publish
from chatreid.config import Settings
from chatreid.prefilter import PrefilterStore, VectorMeta
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.shards import Shard
from chatreid.storage import CROPS_PREFIX, VISION_CACHE_PREFIX, ObjectStore, legacy_key_sha256
from schemas import INDEXED, ErasedEvent

__all__ = ["RETENTION", "Eraser", "current_index", "index_parts"]

RETENTION = "retention"  # the reason retention purges record
_SEND_TIMEOUT_S = 30.0
_STAT_WORKERS = 8  # parallel existence checks of the objects an erasure deletes


def current_index(settings: Settings, objects: ObjectStore | None = None,
                  timeout_s: float = 120.0, shard: Shard | None = None) -> PrefilterStore | None:
    """The index as of now (latest snapshot plus the log since), the whole of it or ``shard``'s
    part; None when nothing was ever indexed there."""
    follower = IndexFollower(settings, objects, shard=shard)
    try:
        follower.restore()
        follower.catch_up(timeout_s)
    finally:
        follower.close()
    return follower.store


def index_parts(settings: Settings, objects: ObjectStore | None = None,
                timeout_s: float = 120.0) -> Iterator[PrefilterStore]:
    """The index as of now, one shard's part at a time (``index.shards``; the whole index when
    unsharded), each from its shard's own snapshot plus its partitions of the log. A caller
    that drops each part before the next holds one shard in memory, never the whole index."""
    for shard in Shard.all(settings.index.shards):
        store = current_index(settings, objects, timeout_s, shard)
        if store is not None:
            yield store


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
            if live is None:  # only the live crops that name one of these keys, part by part
                live = [m for part in index_parts(self.settings, self.objects)
                        for m in part.live_metas() if m.object_key in keys]
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
        """``purge_parts`` over one part: the whole index's crops (``orphans``), or a prefilter
        shard's own (not ``orphans``: the other shards' objects are not in its metas).
        Returns (crops erased, objects deleted)."""
        erased, deleted, _ = self.purge_parts(cutoff, [metas], orphans=orphans)
        return erased, deleted

    def purge_parts(self, cutoff: datetime, parts: Iterable[Sequence[VectorMeta]],
                    orphans: bool = True) -> tuple[int, int, int]:
        """Erase every crop of each part (e.g. ``live_metas()`` of each ``index_parts``)
        captured before ``cutoff`` (reason "retention"), then, when the parts are the whole
        index (``orphans``), delete the crop objects last modified before it that no part holds
        (dead-lettered, never embedded) and every cached feature whose crop is gone. A legacy
        shared object a newer crop of the same part still names is kept. Parts are read one at
        a time: only object keys are kept across them. Returns (crops erased, objects deleted,
        crops indexed)."""
        if cutoff.tzinfo is None:
            raise ValueError("cutoff must be timezone-aware")
        cut = cutoff.timestamp()
        stored = dict(self.objects.list_modified(CROPS_PREFIX))  # one listing for every part
        # never-indexed candidates: old objects, less each part's keys as it goes by
        unindexed = {k for k, modified in stored.items() if orphans and modified < cutoff}
        erased = indexed = 0
        gone: set[str] = set()
        for part in parts:
            metas = _unique(part)
            old = [m for m in metas if m.capture_time < cut]
            kept = {m.object_key for m in metas if m.capture_time >= cut}
            self._announce(old, RETENTION, f"{RETENTION}-{cutoff.isoformat()}")
            doomed = sorted({k for k in (m.object_key for m in old)
                             if k in stored and k not in kept})
            self.objects.delete_many(doomed)
            if not orphans:  # the sweep below covers them otherwise
                self._forget_features(doomed)
            unindexed -= {m.object_key for m in metas}
            gone.update(doomed)
            erased, indexed = erased + len(old), indexed + len(metas)
        if orphans:
            self.objects.delete_many(sorted(unindexed))
            gone |= unindexed
            # every cached feature whose crop is gone: the doomed ones, and those a rerank in
            self._drop_orphan_features(set(stored) - gone)  # flight wrote late
        return erased, len(gone), indexed

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
