"""Rebuild the prefilter index for a new embedder: re-embed every crop the old index holds.

The work list is the old index itself (its latest snapshot plus the log since, through an
``IndexFollower``), so crops that only a snapshot still holds are covered too; the object keys
are in its metadata. It goes shard by shard (``index.shards``; each shard's snapshots and
partitions), so one shard's part of the old index is in memory at a time. Each crop is
fetched, verified (content-addressed keys name their sha256), embedded with the new embedder
and published as an ``IndexedEvent`` of the new version - the same log every reader follows,
so readers build the new index as it fills.

Passes repeat until one finds nothing left: the service writes new crops under both versions
from before the first pass, so what a pass can still find is only what another replica wrote
under the old version alone before it saw the checkpoint. ``settle_s`` between passes gives
such replicas time to finish their batch. Crops that cannot be fetched or decoded are
dead-lettered and listed in the report, which readers take as the signal to switch.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from PIL import Image

from chatreid.bus import dead_letter, make_producer, publish
from chatreid.config import Settings
from chatreid.prefilter import VectorMeta, crop_id_to_int64
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.rebuild import RolloutReport, write_report
from chatreid.prefilter.shards import Shard
from chatreid.storage import ObjectStore
from schemas import INDEXED, DeadLetterEvent, IndexedEvent, SourceOffset
from services.embedder.service import (
    COLOURS,
    CropFailed,
    colour_fields,
    fetch_crop,
    key_sha256,
)

__all__ = ["ReindexCancelled", "Reindexer"]

log = logging.getLogger(__name__)


class ReindexCancelled(RuntimeError):
    """Stopped before the new index covered the old one; a restart resumes (idempotent)."""


class Reindexer:
    def __init__(self, settings: Settings, *, objects: ObjectStore | None = None,
                 settle_s: float = 5.0) -> None:
        self.settings = settings
        self.objects = objects or ObjectStore(settings.s3)
        self.settle_s = settle_s
        self.topic = settings.kafka.topic(INDEXED.name)

    def run(self, old_version: str, embedder, source: SourceOffset,
            stop: threading.Event | None = None) -> RolloutReport:
        """Re-embed until the index of ``embedder.version`` holds every crop of
        ``old_version``'s; writes and returns the rollout report. ``source`` (the checkpoint
        event's offset) is recorded as the provenance of every re-embedded vector."""
        stop = stop or threading.Event()
        producer = make_producer(self.settings.kafka)
        pool = ThreadPoolExecutor(self.settings.embedder.fetch_workers,
                                  thread_name_prefix="reindex-fetch")
        done: set[str] = set()
        failed: dict[str, str] = {}
        passes = 0
        try:  # shard by shard: one shard's part of the old index in memory at a time
            for shard in Shard.all(self.settings.index.shards):
                passes += self._shard(shard, old_version, embedder, source, stop, pool,
                                      producer, done, failed)
        finally:
            pool.shutdown(wait=True)
            producer.close()
        report = RolloutReport(version=embedder.version, from_version=old_version,
                               checkpoint=source, reindexed=len(done),
                               unembeddable=tuple(sorted(failed)), passes=passes)
        key = write_report(self.settings, self.objects, report)
        log.info("reindex for %s done: %d re-embedded, %d unembeddable, %d passes (%s)",
                 embedder.version, len(done), len(failed), passes, key)
        return report

    def _shard(self, shard: Shard, old_version: str, embedder, source: SourceOffset,
               stop: threading.Event, pool, producer, done: set[str],
               failed: dict[str, str]) -> int:
        """Re-embed one shard's crops (its partitions of the log); returns the passes."""
        old = IndexFollower(self.settings, self.objects, embedder_version=old_version,
                            shard=shard)
        new = IndexFollower(self.settings, self.objects, embedder_version=embedder.version,
                            shard=shard)
        passes = 0
        try:
            old.restore()
            new.restore()
            while True:
                passes += 1
                old.catch_up()
                new.catch_up()
                todo = [m for m in (old.store.live_metas() if old.store else [])
                        if m.crop_id not in done and m.crop_id not in failed
                        and (new.store is None or m.crop_id not in new.store)]
                if not todo and passes > 1:
                    return passes
                log.info("reindex %s -> %s, shard %d/%d, pass %d: %d crops", old_version,
                         embedder.version, shard.index + 1, shard.count, passes, len(todo))
                for start in range(0, len(todo), self.settings.embedder.batch_size):
                    if stop.is_set():
                        raise ReindexCancelled(f"reindex for {embedder.version} stopped")
                    batch = todo[start : start + self.settings.embedder.batch_size]
                    self._batch(batch, embedder, source, pool, producer, done, failed)
                producer.flush()  # durable before the next pass reads the log back
                if stop.wait(self.settle_s):
                    raise ReindexCancelled(f"reindex for {embedder.version} stopped")
        finally:
            old.close()
            new.close()

    def _batch(self, metas: list[VectorMeta], embedder, source: SourceOffset, pool,
               producer, done: set[str], failed: dict[str, str]) -> None:
        fetched = list(pool.map(self._fetch, metas))
        good = [(m, img) for m, img in zip(metas, fetched, strict=True)
                if not isinstance(img, CropFailed)]
        for meta, exc in zip(metas, fetched, strict=True):
            if isinstance(exc, CropFailed):
                failed[meta.crop_id] = exc.error
                dead_letter(producer, self.settings.kafka, DeadLetterEvent(
                    stage="embedder", error=exc.error, reason=f"reindex: {exc.reason}",
                    origin=meta.crop_id, **DeadLetterEvent.wrap_payload(None)))
        if not good:
            return
        vectors = embedder.embed([img for _, img in good])
        colours = colour_fields([img for _, img in good])
        for (meta, _), vec, colour in zip(good, vectors, colours, strict=True):
            publish(producer, self.topic, meta.camera,
                    self._indexed(meta, vec, embedder.version, source, colour))
            done.add(meta.crop_id)

    def _fetch(self, meta: VectorMeta) -> Image.Image | CropFailed:
        try:
            return fetch_crop(self.objects, meta.object_key, key_sha256(meta.object_key))
        except CropFailed as exc:
            return exc

    def _indexed(self, meta: VectorMeta, vec, version: str, source: SourceOffset,
                 colour: str) -> IndexedEvent:
        return IndexedEvent(
            crop_id=meta.crop_id, vector_id=crop_id_to_int64(meta.crop_id), site=meta.site,
            camera=meta.camera, modality=meta.modality,
            capture_time=datetime.fromtimestamp(meta.capture_time, UTC),
            object_key=meta.object_key, embedder_version=version, dim=int(vec.shape[0]),
            vector_b64=IndexedEvent.encode_vector(vec),
            source=source,  # provenance: re-embedded because of this checkpoint event
            colours_b64=colour, colours_version=COLOURS.version,
        )
