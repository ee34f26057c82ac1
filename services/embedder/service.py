"""The embedding service: crops topic -> fetch -> embed -> indexed topic, then commit.

A kafka-python consumer group with auto-commit off. Each bounded batch is made durable first
(indexed events acknowledged by every in-sync replica, ``acks=all``), and only then are the
crop offsets committed, so a crash at any point replays the batch instead of losing it; the
prefilter store is idempotent by crop id, so a replay never duplicates. Replicas scale up to the
crops topic's partition count.

Dead letters are for permanent causes only: an event that does not parse, a missing object, a
sha256 mismatch, an image that does not decode. When the object store fails transiently
(connection refused or reset, timeouts, 5xx, SlowDown), nothing of the batch is published,
dead-lettered or committed: the consumer seeks back to the batch's first offsets, pauses its
partitions and keeps polling (so it stays in the group) while it waits with exponential
backoff (``embedder.fetch_backoff_*``) for the store, then retries from there.

During an embedder rollout (:mod:`.rollout`) the service embeds each crop with the live and the
incoming embedder and publishes both vectors; embedders are added and retired only between
batches, so every batch is written under one consistent set of versions.

Batches flow through a short pipeline (``embedder.forward_workers``): while one batch is in its
forward pass on a worker thread, the loop polls, fetches and decodes the next, and publishes and
commits the batches in poll order, each only once all before it are committed. A batch put back
(store outage, refused events) takes every later batch in flight back with it.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata, TopicPartition
from PIL import Image
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

from chatreid.bus import dead_letter, make_consumer, make_producer, position, publish, topic_id
from chatreid.config import EmbedderSettings, Settings
from chatreid.embedder.colour import ColourAttributeMatcher
from chatreid.prefilter import crop_id_to_int64
from chatreid.storage import (
    META_SHA256,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
    legacy_key_sha256,
    sha256_hex,
    transient_error,
)
from schemas import (
    CROPS,
    INDEXED,
    CropEvent,
    DeadLetterEvent,
    EventError,
    IndexedEvent,
    SourceOffset,
)

log = logging.getLogger(__name__)

key_sha256 = legacy_key_sha256  # the sha256 a legacy content-addressed key names, if any


class PublishFailed(KafkaError):
    """The broker did not acknowledge indexed events of a batch: it is put back, not
    committed."""


COLOURS = ColourAttributeMatcher()  # stateless: one per process


def colour_fields(images: list[Image.Image]) -> list[str]:
    """Each image's ``IndexedEvent.colours_b64`` (of ``COLOURS.version``), computed while the
    crop is decoded anyway, so a text query ranks crops without reading their images back
    (~1.4 s for 1,000)."""
    return [IndexedEvent.encode_vector(v) for v in COLOURS.embed_images(images)]


class CropFailed(Exception):
    """A permanent failure of one crop: it is dead-lettered with ``error`` and ``reason``."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.error, self.reason = error, reason


def fetch_crop(store: ObjectStore, object_key: str, sha256: str | None) -> Image.Image:
    """Fetch, verify and decode one crop. Raises :class:`CropFailed` (dead-letter class) for a
    permanent cause and :class:`StoreUnavailable` for a transient one. ``sha256`` None: the
    hash a legacy key names, else the one the ingestor stored in the object's metadata."""
    try:
        data, meta = store.read(object_key)
    except ObjectNotFound as exc:
        raise CropFailed("crop.missing", f"object {object_key} not found") from exc
    except Exception as exc:
        if transient_error(exc):
            raise StoreUnavailable(f"reading {object_key}: {exc!r}") from exc
        raise CropFailed("crop.unreadable", f"object {object_key}: {exc}") from exc
    sha256 = sha256 or legacy_key_sha256(object_key) or meta.get(META_SHA256)
    if sha256 is not None and sha256_hex(data) != sha256:
        raise CropFailed("crop.checksum", f"object {object_key} does not match its sha256")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise CropFailed("image.corrupt", f"decode failed: {exc}") from exc
    return img


def forward_threads(cfg: EmbedderSettings) -> int:
    """Intra-op threads of each forward worker: ``torch_threads`` when set; else, on a CPU, the
    cores shared out among the workers, so that they do not wait for one another's threads at
    every layer; 0 (torch's default) on an accelerator."""
    if cfg.torch_threads or cfg.device != "cpu":
        return cfg.torch_threads
    return max(1, len(os.sched_getaffinity(0)) // cfg.forward_workers)


def _use_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def embed_batch(embedders: Sequence, images: list[Image.Image]
                ) -> tuple[list[str], list[np.ndarray], float]:
    """A forward worker's share of a batch: colour fields and one vector array per embedder,
    and the seconds it took."""
    t0 = time.perf_counter()
    colours = colour_fields(images)
    vectors = [embedder.embed(images) for embedder in embedders]
    return colours, vectors, time.perf_counter() - t0


@dataclass
class _Batch:
    """A polled batch in the pipeline: fetched and decoded, its forward pass submitted; it is
    published and committed once every batch polled before it is."""

    records: list[ConsumerRecord]
    dead: list[tuple[ConsumerRecord, CropFailed, str | None]]  # (record, cause, crop id)
    good: list[tuple[ConsumerRecord, CropEvent]]
    embedders: list  # the versions it is written under, fixed when it was polled
    skipped: int = 0
    forward: Future[tuple[list[str], list[np.ndarray], float]] | None = field(default=None)


@dataclass
class Stats:
    batches: int = 0
    indexed: int = 0
    skipped: int = 0
    dead_letters: int = 0
    store_waits: int = 0  # batches put back because the object store was unavailable
    store_wait_s: float = 0.0  # time spent waiting for it
    publish_retries: int = 0  # batches put back because the broker refused their events
    embed_s: float = 0.0
    last_activity: float = 0.0


class EmbedderService:
    def __init__(self, settings: Settings, embedder=None,
                 is_indexed: Callable[[str], bool] | None = None,
                 busy: Callable[[], bool] | None = None) -> None:
        from chatreid.embedder import embedder_from_settings

        cfg = settings.embedder
        self.settings = settings
        # the live embedder first; during a rollout the incoming one too (see begin_dual_write)
        self._embedders = [embedder or embedder_from_settings(cfg)]
        self._changes: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.busy = busy or (lambda: False)  # e.g. a rollout in progress: do not exit idle
        self.store = ObjectStore(settings.s3)
        self.crops_topic = settings.kafka.topic(CROPS.name)
        self.indexed_topic = settings.kafka.topic(INDEXED.name)
        # optional fast path: a crop already in the local prefilter store is not re-embedded
        self.is_indexed = is_indexed or (lambda _crop_id: False)
        self.stats = Stats(last_activity=time.monotonic())
        self._publish_backoff = cfg.fetch_backoff_initial_s
        self._topic_id = None  # the crops log's identity (see _log_replaced)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(cfg.fetch_workers, thread_name_prefix="fetch")
        # the workers' thread count only: the process's other torch work keeps its own
        self._torch_threads = torch.get_num_threads()
        self._forward = ThreadPoolExecutor(cfg.forward_workers, thread_name_prefix="forward",
                                           initializer=_use_threads,
                                           initargs=(forward_threads(cfg),))
        self._inflight: deque[_Batch] = deque()  # poll order: finished from the left
        self.producer: KafkaProducer = make_producer(settings.kafka)
        self.consumer: KafkaConsumer = make_consumer(
            settings.kafka, cfg.group_id, max_poll_records=cfg.batch_size,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
        )
        self.consumer.subscribe([self.crops_topic])

    # -- embedders ---------------------------------------------------------------------------
    @property
    def embedder(self):
        """The live embedder: the version the index is searched with."""
        return self._embedders[0]

    @property
    def versions(self) -> list[str]:
        return [e.version for e in self._embedders]

    def begin_dual_write(self, embedder) -> threading.Event:
        """From the next batch on, also embed and publish with ``embedder``; thread-safe. The
        event is set once the change applies (every later batch carries both versions)."""
        return self._change(lambda: self._add(embedder))

    def retire(self, version: str) -> threading.Event:
        """From the next batch on, stop publishing ``version`` (unless it is the only one)."""
        return self._change(lambda: self._drop(version))

    def _change(self, apply: Callable[[], None]) -> threading.Event:
        done = threading.Event()

        def apply_then_signal() -> None:
            apply()
            done.set()

        self._changes.put(apply_then_signal)
        return done

    def _apply_changes(self) -> None:
        while True:
            try:
                self._changes.get_nowait()()
            except queue.Empty:
                return

    def _add(self, embedder) -> None:
        if embedder.version not in self.versions:
            self._embedders.append(embedder)
            log.info("embedding with %s", " + ".join(self.versions))

    def _drop(self, version: str) -> None:
        keep = [e for e in self._embedders if e.version != version]
        if keep and len(keep) < len(self._embedders):
            self._embedders = keep
            log.info("retired %s; embedding with %s", version, " + ".join(self.versions))

    # -- loop --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, until_idle_s: float | None = None, max_batches: int | None = None) -> Stats:
        """Process batches until stopped, idle for ``until_idle_s``, or ``max_batches`` done."""
        cfg = self.settings.embedder
        try:
            while not self._stop.is_set():
                if not self._changes.empty():  # a new set of embedders: after the batches
                    self._advance([], keep=0)  # in flight, which were polled under the old
                self._apply_changes()
                polled = self.consumer.poll(
                    timeout_ms=0 if self._inflight else cfg.poll_timeout_ms,
                    max_records=cfg.batch_size)
                records = [r for batch in polled.values() for r in batch]
                if self._log_replaced():  # records from stale positions: read them again
                    self._drop_inflight()  # (those in flight too: offsets of the old log)
                    self.stats.last_activity = time.monotonic()
                elif records:
                    # False: put back (store outage, refused events), polled again
                    self._advance(records, keep=cfg.forward_workers - 1)
                    self.stats.last_activity = time.monotonic()
                    if max_batches and self.stats.batches + len(self._inflight) >= max_batches:
                        break
                elif self._inflight:  # nothing new: finish what is in flight
                    self._advance([], keep=0)
                    self.stats.last_activity = time.monotonic()
                elif self._past_log_end():
                    self.stats.last_activity = time.monotonic()
                elif not self.consumer.assignment():
                    # still joining the group: idle time only counts once partitions are ours
                    self.stats.last_activity = time.monotonic()
                elif self.busy():
                    self.stats.last_activity = time.monotonic()
                elif until_idle_s is not None and (
                    time.monotonic() - self.stats.last_activity > until_idle_s
                ):
                    break
            self._advance([], keep=0)  # stopped or idle: finish what is in flight
        finally:
            self.close()
        return self.stats

    def _log_replaced(self) -> bool:
        """The crops topic was recreated (its id changed: the broker lost its log): positions
        into the old log would skip the new one's first records, so every partition starts
        over at offset 0 of the new log (re-read crops are skipped: the index is idempotent by
        crop id). Not from the committed offset: the consumer answers that from its cache,
        which still holds the old log's offsets and skipped the new log's first crops."""
        now = topic_id(self.consumer, self.crops_topic)
        if now is None or now == self._topic_id:
            return False
        known, self._topic_id = self._topic_id, now
        if known is None:
            return False
        log.warning("%s was recreated (the broker lost its log); starting over in the new log",
                    self.crops_topic)
        for tp in self.consumer.assignment():  # an explicit 0: Tansu's answer to a reset to
            self.consumer.seek(tp, 0)  # "earliest" skipped the new log's first crops
        return True

    def _past_log_end(self) -> bool:
        """Rewind partitions whose position lies beyond the log's end (the high watermark of
        their last fetch): the broker lost the log and started a new one, and Tansu answers
        such fetches with nothing rather than OFFSET_OUT_OF_RANGE, so the consumer would wait
        there forever. Resumes from the committed offset if it is inside the log, else from
        the beginning: a broker that kept its log can report its end one batch short (Tansu),
        and replaying from the start there would re-read it all. (A log that was replaced is
        caught first by its topic id, :meth:`_log_replaced`.) Returns whether any partition
        was rewound."""
        rewound = False
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is None or position(self.consumer, tp) <= hw:
                continue
            committed = self.consumer.committed(tp)
            start = committed if committed is not None and committed <= hw else 0
            log.warning("%s: position %d is beyond the log end %d (the broker lost its log); "
                        "resuming at %d", tp, position(self.consumer, tp), hw, start)
            self.consumer.seek(tp, start)
            rewound = True
        return rewound

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._forward.shutdown(wait=True)
        torch.set_num_threads(self._torch_threads)  # threads started later: the default again
        self.producer.flush()
        self.producer.close()
        self.consumer.close()

    # -- one batch ---------------------------------------------------------------------------
    def process(self, records: list[ConsumerRecord]) -> bool:
        """Embed, publish and commit one batch (after any still in flight); False when it was
        put back (the object store unavailable, or the broker refused what was published) and
        is polled again."""
        return self._advance(records, keep=0)

    def _advance(self, records: list[ConsumerRecord], keep: int) -> bool:
        """Put ``records`` (if any) in flight, then publish and commit the oldest batches until
        at most ``keep`` remain. On a store outage or refused events, every batch in flight
        and ``records`` are put back (False)."""
        try:
            if records:
                self._inflight.append(self._prepare(records))
            while len(self._inflight) > keep:
                self._finish(self._inflight[0])
                self._inflight.popleft()
        except StoreUnavailable as exc:
            log.warning("object store unavailable (%s); batch of %d put back, partitions "
                        "paused until it answers", exc, len(records))
            self._put_back(records)
            self._wait_for_store()
            return False
        except KafkaError as exc:  # PublishFailed, or a dead letter the broker did not take
            delay = self._publish_backoff
            self._publish_backoff = min(delay * 2, self.settings.embedder.fetch_backoff_max_s)
            self.stats.publish_retries += 1
            log.warning("the broker did not take the batch's events (%r); %d batches put back, "
                        "new producer, retry in %.1f s", exc, len(self._inflight), delay)
            self._put_back(records)
            self._renew_producer()
            self._paused_wait(delay)
            return False
        self._publish_backoff = self.settings.embedder.fetch_backoff_initial_s
        return True

    def _put_back(self, records: list[ConsumerRecord]) -> None:
        """Rewind to the first record of ``records`` and of every batch in flight, all dropped
        unpublished: one seek over all of them, so a later batch never seeks past an earlier
        one."""
        held = [r for batch in self._inflight for r in batch.records] + list(records)
        self._drop_inflight()
        self._rewind(held)

    def _drop_inflight(self) -> None:
        """Forget the batches in flight (after their forward passes end: no worker still runs
        an embedder that may be retired next)."""
        wait_all([b.forward for b in self._inflight if b.forward is not None])
        self._inflight.clear()

    def _prepare(self, records: list[ConsumerRecord]) -> _Batch:
        """Parse, fetch and decode a batch and submit its forward pass. Raises
        :class:`StoreUnavailable` before anything of it is in flight."""
        parsed = [self._parse(r) for r in records]
        todo = [(r, e) for r, e in zip(records, parsed, strict=True) if isinstance(e, CropEvent)]
        fresh = [(r, e) for r, e in todo if not self.is_indexed(e.crop_id)]
        # every fetch first: one transient failure puts the whole batch back before anything
        # of it is published or dead-lettered, so a retry never duplicates a dead letter
        images = list(self._pool.map(lambda re: self._fetch(*re), fresh))
        unavailable = next((i for i in images if isinstance(i, StoreUnavailable)), None)
        if unavailable is not None:
            raise unavailable
        dead: list[tuple[ConsumerRecord, CropFailed, str | None]] = [
            (r, f, None) for r, f in zip(records, parsed, strict=True)
            if isinstance(f, CropFailed)]
        dead += [(r, img, e.crop_id) for (r, e), img in zip(fresh, images, strict=True)
                 if isinstance(img, CropFailed)]
        good = [(re, img) for re, img in zip(fresh, images, strict=True)
                if isinstance(img, Image.Image)]
        batch = _Batch(records, dead, [re for re, _ in good], list(self._embedders),
                       skipped=len(todo) - len(fresh))
        if good:
            batch.forward = self._forward.submit(embed_batch, batch.embedders,
                                                 [img for _, img in good])
        return batch

    def _finish(self, batch: _Batch) -> None:
        """Dead-letter, publish (durable, acks=all) and then commit one batch."""
        for record, failed, origin in batch.dead:
            self._dead(record, failed.error, failed.reason, record.value, origin=origin)
        sent = []
        if batch.forward is not None:
            colours, vectors, seconds = batch.forward.result()
            self.stats.embed_s += seconds
            for embedder, vecs in zip(batch.embedders, vectors, strict=True):
                for (record, event), vec, colour in zip(batch.good, vecs, colours, strict=True):
                    sent.append(publish(self.producer, self.indexed_topic, event.camera,
                                        self._indexed(record, event, vec, embedder.version,
                                                      colour)))
        self.producer.flush()  # durable (acks=all) before the offsets move
        failed = [f.exception for f in sent if not f.succeeded()]
        if failed:  # flush() does not raise: an offset committed now would lose the crops
            raise PublishFailed(f"{len(failed)} of {len(sent)} indexed events refused, e.g. "
                                f"{failed[0]!r}")
        self._commit(batch.records)
        self.stats.batches += 1
        self.stats.indexed += len(batch.good)
        self.stats.skipped += batch.skipped

    def _renew_producer(self) -> None:
        """An idempotent producer whose broker lost its state (UnknownProducerId) stays
        broken: start a fresh one (a new producer id)."""
        try:
            self.producer.close(timeout=1)
        except Exception:  # closing a broken producer may fail too
            log.debug("closing the old producer failed", exc_info=True)
        self.producer = make_producer(self.settings.kafka)

    def _parse(self, record: ConsumerRecord) -> CropEvent | CropFailed:
        try:
            return CropEvent.from_bytes(record.value)
        except EventError as exc:
            return CropFailed("event.invalid", str(exc))
        except Exception as exc:  # undecodable bytes, wrong encoding ...
            return CropFailed("event.undecodable", repr(exc))

    def _fetch(self, record: ConsumerRecord,
               event: CropEvent) -> Image.Image | CropFailed | StoreUnavailable:
        try:
            return fetch_crop(self.store, event.object_key, event.sha256)
        except (CropFailed, StoreUnavailable) as exc:
            return exc

    # -- object store outages ------------------------------------------------------------------
    def _rewind(self, records: list[ConsumerRecord]) -> None:
        """Seek every partition of ``records`` still ours back to its first record there (the
        uncommitted offset): the next poll returns the batch again."""
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        owned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in owned:  # a partition moved meanwhile: its new owner starts from the commit
                self.consumer.seek(tp, offset)

    def _wait_for_store(self) -> None:
        """Wait, with exponential backoff, until the object store answers (partitions paused,
        see :meth:`_paused_wait`)."""
        cfg = self.settings.embedder
        delay, started = cfg.fetch_backoff_initial_s, time.monotonic()
        self.stats.store_waits += 1
        try:
            while not self._stop.is_set():
                self._paused_wait(delay)
                if self.store.healthy():
                    log.info("object store answers again after %.1f s; retrying the batch",
                             time.monotonic() - started)
                    return
                log.warning("object store still unavailable after %.0f s; next try in %.1f s",
                            time.monotonic() - started, min(delay * 2, cfg.fetch_backoff_max_s))
                delay = min(delay * 2, cfg.fetch_backoff_max_s)
        finally:
            self.stats.store_wait_s += time.monotonic() - started

    def _paused_wait(self, seconds: float) -> None:
        """Let ``seconds`` pass with every partition paused, polling all along so that the
        group keeps this member (max_poll_interval_ms); a partition assigned meanwhile is
        paused too, and anything it returned put back."""
        deadline = time.monotonic() + seconds
        self.consumer.pause(*self.consumer.assignment())
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                polled = self.consumer.poll(timeout_ms=min(
                    self.settings.embedder.poll_timeout_ms,
                    max(1, int((deadline - time.monotonic()) * 1000))))
                if polled:  # a rebalance gave us unpaused partitions: put back, pause
                    self._rewind([r for batch in polled.values() for r in batch])
                self.consumer.pause(*self.consumer.assignment())
        finally:
            self.consumer.resume(*self.consumer.assignment())

    def _indexed(self, record: ConsumerRecord, event: CropEvent, vec,
                 version: str, colour: str) -> IndexedEvent:
        return IndexedEvent(
            crop_id=event.crop_id, vector_id=crop_id_to_int64(event.crop_id), site=event.site,
            camera=event.camera, modality=event.modality, capture_time=event.capture_time,
            object_key=event.object_key, embedder_version=version,
            dim=int(vec.shape[0]), vector_b64=IndexedEvent.encode_vector(vec),
            source=SourceOffset(topic=record.topic, partition=record.partition,
                                offset=record.offset),
            colours_b64=colour, colours_version=COLOURS.version,
        )

    def _dead(self, record: ConsumerRecord, error: str, reason: str, raw: bytes | None,
              origin: str | None = None) -> None:
        self.stats.dead_letters += 1
        event = DeadLetterEvent(
            stage="embedder", error=error, reason=reason, origin=origin,
            source=SourceOffset(topic=record.topic, partition=record.partition,
                                offset=record.offset),
            **DeadLetterEvent.wrap_payload(raw),
        )
        dead_letter(self.producer, self.settings.kafka, event)

    def _commit(self, records: list[ConsumerRecord]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in offsets or offsets[tp].offset <= r.offset:
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        # A rebalance in progress clears once the group rejoins (a poll drives it): retry the
        # commit a few times; a commit refused after the rebalance means another replica owns
        # the partitions now and replays the batch (the store is idempotent by crop id).
        def rejoin(_: object) -> None:  # the poll drives the group's rejoin
            self.consumer.poll(timeout_ms=0)

        retrying = Retrying(
            retry=retry_if_exception_type(RebalanceInProgressError),
            stop=stop_after_attempt(5), wait=wait_incrementing(0.2, 0.2),
            before_sleep=rejoin, reraise=True)
        try:
            retrying(self.consumer.commit, offsets)
        except CommitFailedError:
            log.warning("commit failed after a rebalance; the new owner replays the batch")
        except RebalanceInProgressError:
            log.warning("commit still rebalancing after retries; the batch will be replayed")
