"""The camera ingestor: validate a crop, store it under its own key, publish a crop event.

Order matters: the object is written before the event that points at it is published, so a
consumer never sees an event whose crop is missing. Each crop gets its own object
(``storage.crop_key``: capture date and crop id), never one shared by equal bytes, so erasing
a crop deletes only its own image; the object carries its sha256 and its ``CropEvent`` as
metadata, so the object store alone can rebuild the crops stream (:func:`stored_events`). A bad
crop becomes a dead letter with the reason; the caller's stream carries on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import TopicPartition

from chatreid.bus import dead_letter, make_producer, publish
from chatreid.config import Settings
from chatreid.storage import (
    CROPS_PREFIX,
    MAX_META_BYTES,
    META_EVENT,
    META_SHA256,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
    crop_key,
    sha256_hex,
    transient_error,
)
from schemas import CROPS, BBox, CropEvent, DeadLetterEvent, EventError
from schemas.events import Modality
from services.ingestor.validate import CropRejected, validate_crop, validate_metadata

log = logging.getLogger(__name__)

# A rejected upload's dead letter keeps only its first bytes (enough to see what was sent) plus
# its size and sha256 in the reason: up to ``ingestor.max_bytes`` per bad upload would turn the
# dead-letter topic into a store of junk.
REJECTED_PAYLOAD_BYTES = 4096
_STORE_BACKOFF_MAX_S = 4.0  # longest wait between two tries of a crop write (store down)


@dataclass
class CropInput:
    """A crop as a source hands it over, before validation."""

    data: bytes
    camera: str
    capture_time: datetime
    modality: str | None = None  # None: infer (single-channel images are infrared)
    track_id: str | None = None
    detection_id: str | None = None
    bbox: tuple[int, int, int, int] | None = None
    origin: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class IngestResult:
    event: CropEvent | None = None
    error: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.event is not None


def make_crop_id(site: str, camera: str, capture_time: datetime, track_id: str | None,
                 detection_id: str | None, sha256: str) -> str:
    """Deterministic: re-ingesting the same sighting yields the same id (idempotency key)."""
    parts = [site, camera, capture_time.isoformat(), track_id or "", detection_id or "", sha256]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class Ingestor:
    """``store_wait_s``: how long one crop's write waits out an object-store outage (retrying
    with backoff) before :class:`~chatreid.storage.StoreUnavailable` is raised; a long-running
    source rides out a restart of the store, an HTTP upload should answer 503 sooner."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None,
                 producer: KafkaProducer | None = None, source: str = "unknown",
                 store_wait_s: float = 60.0) -> None:
        self.settings = settings
        self.store_wait_s = store_wait_s
        self.store = store or ObjectStore(settings.s3)
        self.producer = producer or self._make_producer()
        self.topic = settings.kafka.topic(CROPS.name)
        self.source = source
        self.published = 0
        self.rejected = 0
        # partition -> (offset, sha256 of the value) of the newest event the broker acknowledged:
        # if the broker no longer holds that record, it lost what we handed it (log_lost)
        self.acked: dict[int, tuple[int, str]] = {}
        # (future, key, value) not settled
        self._sent: list[tuple[FutureRecordMetadata | None, bytes, bytes]] = []
        self._failed: list[tuple[bytes, bytes]] = []  # (key, value) the broker refused

    def submit(self, crop: CropInput) -> IngestResult:
        """Validate, store, publish (asynchronously; ``flush`` makes it durable)."""
        try:
            event = self._store(crop)
        except CropRejected as exc:
            self.rejected += 1
            self._dead_letter(crop, exc.error, exc.reason)
            return IngestResult(error=exc.error, reason=exc.reason)
        self._send(event)
        self.published += 1
        return IngestResult(event=event)

    def _send(self, event: CropEvent) -> None:
        self._send_raw(event.camera.encode(), event.to_bytes())

    def _send_raw(self, key: bytes, value: bytes) -> None:
        self._sent.append((self.producer.send(self.topic, key=key, value=value), key, value))
        if len(self._sent) >= 1024:
            self._note_acked()

    def _note_acked(self) -> None:
        """Record the newest acknowledged offset per partition and the refused sends; forget
        the settled ones."""
        pending = []
        for future, key, value in self._sent:
            if future is None:  # a stand-in producer that does not report
                continue
            if not future.is_done:
                pending.append((future, key, value))
            elif future.succeeded():
                meta = future.value
                if meta.offset > self.acked.get(meta.partition, (-1, ""))[0]:
                    self.acked[meta.partition] = (meta.offset, sha256_hex(value))
            else:
                self._failed.append((key, value))
        self._sent = pending

    def flush(self, timeout: float = 60) -> None:
        """Wait until the broker acknowledged every crop event sent so far. ``flush()`` of
        the producer does not raise for refused sends: they are sent again with a fresh
        producer (an idempotent producer whose broker lost its state stays broken), up to
        five times with backoff; then :class:`~kafka.errors.KafkaError` is raised, so a
        caller never takes them for durable."""
        self.producer.flush(timeout=timeout)
        self._note_acked()
        for attempt in range(5):
            if not self._failed:
                return
            failed, self._failed = self._failed, []
            log.warning("the broker refused %d crop events; sending them again", len(failed))
            self._renew_producer(attempt)
            for key, value in failed:
                self._send_raw(key, value)
            self.producer.flush(timeout=timeout)
            self._note_acked()
        if self._failed:
            count, self._failed = len(self._failed), []
            raise KafkaError(f"the broker refused {count} crop events after 5 tries")

    def _renew_producer(self, attempt: int) -> None:
        """Back off, then replace the producer: an idempotent producer whose broker lost its
        state (a memory-only broker restarted) stays broken for good."""
        time.sleep(0.5 * 2 ** attempt)
        try:
            self.producer.close(timeout=1)
        except Exception:  # a broken producer may not close cleanly
            log.debug("closing the old producer failed", exc_info=True)
        self.producer = self._make_producer()

    def _make_producer(self) -> KafkaProducer:
        return make_producer(self.settings.kafka,
                             linger_ms=self.settings.ingestor.producer_linger_ms)

    def log_lost(self, timeout_s: float = 10.0) -> bool:
        """Whether the broker lost crop events it acknowledged: the newest acknowledged record
        of some partition is no longer there (a memory-only broker restarted, or the topic was
        recreated). False when nothing was acknowledged or the broker cannot tell yet."""
        if not self.acked:
            return False
        from chatreid.bus import make_consumer

        tps = {TopicPartition(self.topic, p): at for p, at in self.acked.items()}
        try:
            consumer = make_consumer(self.settings.kafka, None, fetch_max_wait_ms=100)
        except Exception:  # no broker: ask again later
            return False
        try:
            consumer.assign(list(tps))
            for tp, (offset, _) in tps.items():
                consumer.seek(tp, offset)
            seen: dict[TopicPartition, bool] = {}  # partition -> still holds the record
            deadline = time.monotonic() + timeout_s
            while len(seen) < len(tps) and time.monotonic() < deadline:
                for tp, records in consumer.poll(timeout_ms=200).items():
                    if tp in tps and tp not in seen and records:
                        first = records[0]
                        seen[tp] = (first.offset == tps[tp][0]
                                    and sha256_hex(first.value) == tps[tp][1])
                for tp, (offset, _) in tps.items():
                    hw = consumer.highwater(tp)  # the fetch's log end (ListOffsets can be short)
                    if tp not in seen and hw is not None and hw <= offset:
                        seen[tp] = False
        except Exception:  # the broker went away meanwhile: ask again later
            log.debug("could not check the crops log", exc_info=True)
            return False
        finally:
            consumer.close()
        return not all(seen.get(tp, True) for tp in tps)

    def recover(self) -> int:
        """After a broker lost crop events: publish again every stored crop the index (its
        snapshot plus the log) does not hold, and wait until the broker has them. Returns the
        number published. Crop ids make whatever was indexed meanwhile a duplicate, dropped.
        The index is read one shard's part at a time; only its crop ids' digests are kept."""
        held = HeldIds.of_index(self.settings, self.store)
        self.acked.clear()  # the old offsets name the lost log
        count = 0
        for event in stored_events(self.store):
            if event.crop_id not in held:
                self._send(event)
                count += 1
        self.flush()
        log.warning("the broker had lost crop events: published %d stored crops the index did "
                    "not hold again", count)
        return count

    def close(self) -> None:
        self.flush()
        self.producer.close()

    def _store(self, crop: CropInput) -> CropEvent:
        capture_time = validate_metadata(crop.camera, crop.capture_time, self.settings.ingestor)
        valid = validate_crop(crop.data, self.settings.ingestor)
        digest = sha256_hex(crop.data)
        # a given modality is the sender's string: CropEvent checks it (rejected below)
        modality = cast(Modality, crop.modality
                        or ("infrared" if valid.mode in ("L", "I", "I;16") else "rgb"))
        crop_id = make_crop_id(self.settings.site, crop.camera, capture_time, crop.track_id,
                               crop.detection_id, digest)
        key = crop_key(crop_id, capture_time, valid.ext)
        try:
            event = CropEvent(
                crop_id=crop_id, site=self.settings.site, camera=crop.camera, modality=modality,
                capture_time=capture_time, track_id=crop.track_id,
                detection_id=crop.detection_id,
                bbox=BBox(x=crop.bbox[0], y=crop.bbox[1], w=crop.bbox[2], h=crop.bbox[3])
                if crop.bbox else None,
                object_key=key, sha256=digest, width=valid.width, height=valid.height,
                content_type=valid.content_type, source=self.source, labels=crop.labels,
            )
        except ValueError as exc:  # pydantic: bad camera name, bbox, modality ...
            raise CropRejected("event.invalid", str(exc).splitlines()[0]) from exc
        self._put(key, crop.data, valid.content_type, object_metadata(event))
        return event

    def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        """Write the crop, retrying transient failures with exponential backoff for up to
        ``store_wait_s``; the event is published only after this returns."""
        delay, deadline = 0.5, time.monotonic() + self.store_wait_s
        while True:
            try:
                self.store.put(key, data, content_type=content_type, metadata=metadata)
                return
            except Exception as exc:
                if not transient_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"writing {key}: {exc!r}") from exc
                log.warning("object store unavailable (%r); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, _STORE_BACKOFF_MAX_S)

    def _dead_letter(self, crop: CropInput, error: str, reason: str) -> None:
        event = DeadLetterEvent(
            stage="ingestor", error=error,
            reason=f"{reason} (upload: {len(crop.data)} bytes, sha256 {sha256_hex(crop.data)}"
                   f"; payload keeps the first {REJECTED_PAYLOAD_BYTES} bytes)",
            origin=crop.origin or f"{crop.camera}@{crop.capture_time.isoformat()}",
            **DeadLetterEvent.wrap_payload(crop.data, limit=REJECTED_PAYLOAD_BYTES),
        )
        for attempt in range(5):  # the same renewal as crop events: a reason is never lost
            try:
                return dead_letter(self.producer, self.settings.kafka, event)
            except KafkaError as exc:
                if attempt == 4:
                    raise
                log.warning("the broker refused a dead letter (%s); sending it again",
                            type(exc).__name__)
                self._renew_producer(attempt)


def object_metadata(event: CropEvent) -> dict[str, str]:
    """What a crop object carries besides its bytes: its sha256 (readers verify keys that do
    not name it) and, when it fits S3's 2 KiB, its event as ASCII JSON (see stored_events)."""
    meta = {META_SHA256: event.sha256}
    doc = json.dumps(event.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=True)
    if len(doc) + len(event.sha256) + 64 <= MAX_META_BYTES:
        meta[META_EVENT] = doc
    else:  # long labels: the object is still served and erased, only not rebuildable
        log.info("crop %s: event too large for object metadata (%d bytes)", event.crop_id,
                 len(doc))
    return meta


class HeldIds:
    """The crop ids an index holds, as sorted 64-bit digests: 8 bytes a crop, where the index
    holds ~750 (a 100M-crop site's ids fit in 800 MB, its index does not). A stored crop
    wrongly taken as held needs a digest collision with one of the held: ~n_held / 2^64 per
    crop, 5e-12 at 100M."""

    def __init__(self, crop_ids: Iterable[str]) -> None:
        self.digests = np.unique(np.fromiter((self._digest(c) for c in crop_ids), np.uint64))

    @classmethod
    def of_index(cls, settings: Settings, objects: ObjectStore | None = None) -> HeldIds:
        from chatreid.retention import index_parts

        return cls(c for part in index_parts(settings, objects) for c in part.crop_ids())

    @staticmethod
    def _digest(crop_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(crop_id.encode(), digest_size=8).digest(), "big")

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, crop_id: str) -> bool:
        d = np.uint64(self._digest(crop_id))
        i = int(np.searchsorted(self.digests, d))
        return i < len(self.digests) and self.digests[i] == d


def stored_events(store: ObjectStore, prefix: str = CROPS_PREFIX) -> Iterator[CropEvent]:
    """The crop events kept in object metadata, in key order: enough to republish the crops
    stream after the broker lost it (crop ids are stable, so whatever was already indexed is
    deduplicated). Objects without one (legacy keys, oversized events) are skipped."""
    for key in store.list(prefix):
        try:
            raw = store.metadata(key).get(META_EVENT)
        except ObjectNotFound:  # erased while listing
            continue
        if raw is None:
            continue
        try:
            yield CropEvent.from_bytes(raw)
        except EventError as exc:
            log.warning("object %s: unreadable crop event in metadata: %s", key, exc)


def republish(settings: Settings, store: ObjectStore | None = None,
              producer: KafkaProducer | None = None) -> int:
    """Publish every crop event kept in object metadata to the crops topic again - after a
    broker lost its log (the local memory-only broker restarted) - and wait until the broker
    has them. The embedder skips or deduplicates what was indexed already (crop ids); erased
    crops have no object, so they do not come back. Returns the number published."""
    store = store or ObjectStore(settings.s3)
    own = producer is None
    producer = producer or make_producer(settings.kafka)
    topic = settings.kafka.topic(CROPS.name)
    count = 0
    try:
        for event in stored_events(store):
            publish(producer, topic, event.camera, event)
            count += 1
        producer.flush(timeout=60)
    finally:
        if own:
            producer.close()
    return count
