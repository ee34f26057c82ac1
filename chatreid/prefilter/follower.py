"""Keep a prefilter store fresh: restore the latest snapshot, replay the indexed log's gap, follow.

The ``indexed`` topic is the store's write-ahead log (each event carries its vector); snapshots
in object storage record the log offsets they cover. A restarted reader or embedder restores a
snapshot and replays only the events after those offsets. Applying an event is idempotent by
crop id, so overlapping replays never duplicate.

Resuming at a snapshot's offsets does not trust the broker's reported log end (Tansu reports
the last batch's base offset + 1, one batch short, which made every restart replay the whole
log): the follower reads the record just before each snapshot offset and checks it against the
fingerprint (sha256) the snapshot recorded for it. Only a log that does not hold that record -
shorter (a memory-only broker restarted) or different (a new log grown past the offset) - is
replayed from its beginning, into the restored store (idempotent by crop id).
``stats.read`` counts the records read, ``stats.replay_gap`` what was behind at resume.

Erasure: an ``ErasedEvent`` on the same log removes its crop from every follower whatever the
embedder version, and the follower remembers the erased id (a tombstone) so that an
``IndexedEvent`` of that crop arriving later (a batch in flight, a rollout re-embed) is ignored.
Tombstones are saved beside each snapshot, so a restored follower keeps ignoring such events;
a snapshot is written without erased rows, and it replaces (deletes) the older ones, which may
still hold erased vectors.

Embedder rollouts: vectors of different embedders are not comparable, so a follower serves one
version. :meth:`IndexFollower.prepare` starts a second, hidden follower for a new version beside
it (its snapshot, if any, then the log); searches keep using the live store until the rollout
report exists and the new store covers the live one (see :mod:`.rollout`), then
:meth:`poll` / :meth:`catch_up` switch store, version and log position in one step.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from chatreid.bus import assign_all, end_offsets, make_consumer, position, topic_id
from chatreid.config import Settings
from chatreid.prefilter.rebuild import RolloutReport, read_report
from chatreid.prefilter.shards import Shard
from chatreid.prefilter.store import PrefilterStore, VectorMeta
from chatreid.storage import ObjectNotFound, ObjectStore, sha256_hex
from schemas import INDEXED, ErasedEvent, EventError, IndexedEvent, parse_index_log

log = logging.getLogger(__name__)

_METADATA_MAX_AGE_MS = 5_000  # how stale the topic id may be (see _open)
_SWITCH_CHECK_S = 1.0  # while following, how often a pending version's readiness is checked
# Late IndexedEvents of an erased crop come from batches in flight or a re-embedding pass that
# read the crop just before its object was deleted: minutes after the erasure. Tombstones are
# kept this long in log time (event timestamps, so a replay decides the same), then forgotten,
# which bounds their memory although retention erases every crop in the end.
_TOMBSTONE_KEEP_S = 7 * 86400.0
_TOMBSTONE_PRUNE_S = 3600.0  # forget expired tombstones at most once per hour of log time
_RESTORE_TRIES = 3  # a snapshot replaced (and deleted) while it was read: read the new one
_SNAPSHOT_RETRY_S = 10.0  # after a failed snapshot (object store down)
_VERIFY_S = 10.0  # how long resuming waits for the records that check the snapshot's offsets


@dataclass
class FollowerStats:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    snapshots: int = 0
    switches: int = 0
    erased: int = 0  # crops erased (erasure events, each crop counted once)
    suppressed: int = 0  # indexed events ignored because their crop was erased
    read: int = 0  # log records read (every kind, applied or not) since the follower opened
    replay_gap: int = 0  # records between the resume offsets and the log end when it opened
    log_resets: int = 0  # partitions replayed from the start: the log lost the snapshot's
    latencies_s: list[float] = field(default_factory=list)  # capture -> searchable

    def log_summary(self) -> dict[str, int]:
        """How the index came back (a replica's status): records read from the log since it
        opened, the gap behind its snapshot at resume, partitions replayed from the start."""
        return {"read": self.read, "replay_gap": self.replay_gap,
                "log_resets": self.log_resets}


class IndexFollower:
    def __init__(self, settings: Settings, objects: ObjectStore | None = None,
                 embedder_version: str | None = None, snapshots: bool = False,
                 keep_latencies: bool = False, shard: Shard | None = None) -> None:
        self.settings = settings
        self.objects = objects or ObjectStore(settings.s3)
        self.topic = settings.kafka.topic(INDEXED.name)
        # a shard follows only its partitions of the log, and keeps its own snapshots
        self.shard = shard or Shard(0, 1)
        base = settings.index.snapshot_prefix
        self.prefix = f"{base}/{self.shard.folder}" if self.shard.folder else base
        self.embedder_version = embedder_version
        self.store: PrefilterStore | None = None
        self.stats = FollowerStats()
        self.snapshots = snapshots  # only one writer of snapshots per deployment
        self.keep_latencies = keep_latencies
        self.lock = threading.Lock()  # guards store replacement, not searches
        self._consumer: KafkaConsumer | None = None
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_retry_at = 0.0
        # rollouts: a version asked for (any thread), its follower (the polling thread only)
        self._wanted: str | None = None
        self._next: IndexFollower | None = None
        self._report: RolloutReport | None = None
        self._checked_at = 0.0
        # erased crop id -> erased_at (epoch s); log time: the newest event timestamp seen
        self._erased: dict[str, float] = {}
        self._log_time = 0.0
        self._pruned_at = 0.0
        # "topic:partition" -> (offset, sha256 of its value): the last record applied there,
        # saved with snapshots so a resume can tell the log it left from a different one
        self._anchors: dict[str, tuple[int, str]] = {}
        self._topic_id = None  # the log's identity when it was opened (see _log_replaced)

    # -- versions --------------------------------------------------------------------------------
    def active(self) -> tuple[str | None, PrefilterStore | None]:
        """The served (version, store) pair, read together: a switch never splits them."""
        with self.lock:
            return self.embedder_version, self.store

    @property
    def pending_version(self) -> str | None:
        """The version being built beside the live one, if any."""
        return self._wanted

    def prepare(self, version: str) -> None:
        """Build the index of ``version`` beside the live one; safe from any thread. The next
        :meth:`poll` / :meth:`catch_up` starts it and switches once it is complete."""
        with self.lock:
            if version != self.embedder_version:
                self._wanted = version

    # -- snapshots -----------------------------------------------------------------------------
    def _latest_key(self) -> str:
        return f"{self.prefix}/latest.json"

    def restore(self) -> bool:
        """Load the latest snapshot and its tombstones, if any; returns whether one was loaded."""
        for _ in range(_RESTORE_TRIES):
            try:
                pointer = json.loads(self.objects.get(self._latest_key()))
            except ObjectNotFound:
                return False
            if self.embedder_version and pointer["embedder_version"] != self.embedder_version:
                log.warning("latest snapshot is for embedder %s, not %s; rebuilding from the log",
                            pointer["embedder_version"], self.embedder_version)
                return False
            try:
                data = self._verified(pointer["key"], pointer["sha256"])
                erased = (json.loads(self._verified(pointer["erased_key"],
                                                    pointer["erased_sha256"]))
                          if "erased_key" in pointer else {})
            except ObjectNotFound:  # replaced by a newer snapshot meanwhile: read that one
                continue
            store = PrefilterStore.from_bytes(data)
            # the settings of this deployment, not of the one that wrote the snapshot: a
            # changed index.kind applies from the next add (a compressed store stays so)
            store.reconfigure(self.settings.index.kind, self.settings.index.target_recall)
            with self.lock:
                self.store = store
                self.embedder_version = pointer["embedder_version"]
            self._erased = {str(c): float(t) for c, t in erased.items()}
            self._log_time = max(self._erased.values(), default=0.0)
            self._anchors = {str(k): (int(v[0]), str(v[1]))
                             for k, v in pointer.get("anchors", {}).items()}
            log.info("restored snapshot %s (%d vectors, %d tombstones)", pointer["key"],
                     len(self.store), len(self._erased))
            return True
        log.warning("snapshots kept changing while being restored; rebuilding from the log")
        return False

    def _verified(self, key: str, sha256: str) -> bytes:
        data = self.objects.get(key)
        if sha256_hex(data) != sha256:
            raise ValueError(f"snapshot {key} does not match its sha256")
        return data

    def snapshot(self) -> str | None:
        """Write the store (without erased rows), its tombstones and a pointer to both, then
        delete the older snapshots; returns the snapshot's key."""
        if self.store is None:
            return None
        self.store.compact()  # erased vectors and metadata must not reach object storage
        data = self.store.to_bytes()
        digest = sha256_hex(data)
        folder = f"{self.prefix}/{self.embedder_version}"
        key = f"{folder}/{digest}.faiss"
        self.objects.put(key, data)
        erased = json.dumps(self._erased, sort_keys=True).encode()
        erased_digest = sha256_hex(erased)
        erased_key = f"{folder}/{erased_digest}.erased.json"
        self.objects.put(erased_key, erased, "application/json")
        pointer = {"key": key, "sha256": digest, "embedder_version": self.embedder_version,
                   "vectors": len(self.store), "offsets": dict(self.store.offsets),
                   "erased_key": erased_key, "erased_sha256": erased_digest,
                   "anchors": {k: list(v) for k, v in self._anchors.items()
                               if self.store.offsets.get(k) == v[0] + 1},
                   "created_at": time.time()}
        self.objects.put(self._latest_key(), json.dumps(pointer).encode(), "application/json")
        self._drop_snapshots_but({key, erased_key})
        self.stats.snapshots += 1
        self._since_snapshot, self._last_snapshot = 0, time.monotonic()
        return key

    def _drop_snapshots_but(self, keep: set[str]) -> None:
        """Older snapshots (of any version: the pointer names one) may hold erased crops. A
        failure is retried by the next snapshot, which lists them all again. Only this
        shard's: an unsharded follower's folder holds the shards' folders too."""
        try:
            start = len(self.prefix) + 1
            old = [k for k in self.objects.list(f"{self.prefix}/")
                   if k.endswith((".faiss", ".erased.json")) and k not in keep
                   and not k.startswith("shard-", start)]
            if old:
                self.objects.delete_many(old)
        except Exception:
            log.exception("could not delete older snapshots; the next snapshot retries")

    # -- log -------------------------------------------------------------------------------------
    def _open(self) -> KafkaConsumer:
        if self._consumer is None:
            # no group: every partition. Fresh metadata every few seconds: a recreated topic
            # (a memory-only broker restarted) is told by its new id, which kafka-python
            # otherwise re-reads only every 5 min - meanwhile the new log's first records,
            # below this follower's old positions, would stay unread
            consumer = make_consumer(self.settings.kafka, None,
                                     metadata_max_age_ms=_METADATA_MAX_AGE_MS)
            tps = assign_all(consumer, self.topic, self.shard.owns)
            if not tps:
                consumer.close()
                raise ValueError(f"prefilter shard {self.shard.index} of {self.shard.count} "
                                 f"owns no partition of {self.topic}: index.shards must not "
                                 "exceed the topic's partitions")
            offsets = self.store.offsets if self.store else {}
            starts = self._resume_offsets({tp: offsets.get(_key(tp), 0) for tp in tps},
                                          consumer)
            for tp, start in starts.items():
                consumer.seek(tp, start)
            ends = end_offsets(consumer, tps)
            self.stats.replay_gap = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
            if offsets:
                log.info("resuming %s at the snapshot's offsets: %d records to replay",
                         self.topic, self.stats.replay_gap)
            self._topic_id = topic_id(consumer, self.topic)
            self._consumer = consumer
        return self._consumer

    def _resume_offsets(self, starts: dict[TopicPartition, int],
                        consumer: KafkaConsumer) -> dict[TopicPartition, int]:
        """The offsets to resume at: each snapshot offset whose preceding record the log still
        holds (and, when the snapshot recorded it, with the same content); 0 for a partition
        whose log is shorter or different. Reads one record per partition and leaves the
        consumer's positions to the caller."""
        check = {tp: s for tp, s in starts.items() if s > 0}
        if not check:
            return starts
        consumer.pause(*(tp for tp in starts if tp not in check))
        for tp, start in check.items():
            consumer.seek(tp, start - 1)
        # the first record, None: the log is shorter
        found: dict[TopicPartition, ConsumerRecord | None] = {}
        deadline = time.monotonic() + _VERIFY_S
        while len(found) < len(check) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                if tp in check and tp not in found and records:
                    found[tp] = records[0]
                    consumer.pause(tp)
            for tp, start in check.items():
                hw = consumer.highwater(tp)  # a fetch response's end: right where ListOffsets
                if tp not in found and hw is not None and hw < start:  # is short (Tansu)
                    found[tp] = None
                    consumer.pause(tp)
        consumer.resume(*starts)
        result = dict(starts)
        for tp, start in check.items():
            if tp not in found:
                log.warning("%s: could not read the log at the snapshot offset %d within %.0f "
                            "s; resuming there unverified", tp, start, _VERIFY_S)
                continue
            record, anchor = found[tp], self._anchors.get(_key(tp))
            if record is None:
                why = f"the log ends at {consumer.highwater(tp)}"
            elif (record.offset == start - 1 and anchor is not None
                  and anchor != (record.offset, sha256_hex(record.value))):
                why = f"its record at offset {start - 1} is not the one the snapshot saw"
            else:  # the record is there (or retention deleted it: offset >= start - 1)
                continue
            log.warning("%s: snapshot offset %d not in this log (%s: the broker lost or "
                        "replaced it); replaying the partition from its start", tp, start, why)
            self.stats.log_resets += 1
            result[tp] = 0
        return result

    def catch_up(self, timeout_s: float = 60.0) -> int:
        """Apply everything written to the log up to now; returns vectors newly added.

        Past the reported end offsets it polls once more until nothing comes back: some
        Kafka-protocol brokers (Tansu) report the last batch's base offset + 1 as the end.
        """
        consumer = self._open()
        ends = end_offsets(consumer, list(consumer.assignment()))
        before, deadline = self.stats.applied, time.monotonic() + timeout_s
        while True:
            if self._open() is not consumer:  # the log was replaced: a new consumer reads it
                consumer = self._open()
                ends = end_offsets(consumer, list(consumer.assignment()))
            behind = any(position(consumer, tp) < end for tp, end in ends.items())
            if not self._poll_live(timeout_ms=200) and not behind:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"index not caught up within {timeout_s}s")
        nxt = self._pending()
        if nxt is not None:
            nxt.catch_up(max(1.0, deadline - time.monotonic()))
            self._maybe_switch()
        return self.stats.applied - before

    def poll(self, timeout_ms: int = 500) -> int:
        """Apply one poll's worth of the log (and of a pending version's, switching to it when
        it is ready); returns how many records the live log gave."""
        if self._wanted is None:
            return self._poll_live(timeout_ms)
        read = self._poll_live(timeout_ms // 2)
        try:  # a failing rollout must not stop the live index from following its log
            nxt = self._pending()
            if nxt is not None:
                nxt.poll(timeout_ms // 2)
                if time.monotonic() - self._checked_at >= _SWITCH_CHECK_S:
                    self._maybe_switch()
        except Exception:
            log.exception("building the index of %s failed; retrying", self._wanted)
        return read

    def _poll_live(self, timeout_ms: int) -> int:
        consumer = self._open()
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=512)
        if not polled:
            self._rewind_past_log_end(consumer)
        for tp, records in polled.items():
            self._apply(records)
            self.stats.read += len(records)
            last = records[-1]
            self._anchors[_key(tp)] = (last.offset, sha256_hex(last.value))
            if self.store is not None:
                self.store.offsets[_key(tp)] = last.offset + 1
        self._log_replaced(consumer)
        if self.snapshots:
            self._maybe_snapshot()
        return sum(len(records) for records in polled.values())

    def _log_replaced(self, consumer: KafkaConsumer) -> None:
        """The topic was recreated while this follower ran (its id changed: the broker lost
        the log): positions into the old log skip the new one's first records, so replay it
        from its start, into the store as it is (idempotent by crop id)."""
        now = topic_id(consumer, self.topic)
        if now is None or now == self._topic_id:
            return
        if self._topic_id is None:
            self._topic_id = now
            return
        log.warning("%s was recreated (the broker lost its log); replaying it from its start",
                    self.topic)
        self.stats.log_resets += len(consumer.assignment())
        # a new consumer: the old one's fetch state (sessions, leader epochs) names the old
        # log and kept fetching nothing from the new one
        consumer.close()
        self._consumer, self._topic_id = None, None
        self._anchors.clear()
        if self.store is not None:
            self.store.offsets.clear()

    def _rewind_past_log_end(self, consumer: KafkaConsumer) -> None:
        """A position beyond the log's end (its last fetch's high watermark) means the broker
        lost the log while this follower ran (Tansu answers such fetches with nothing, not
        OFFSET_OUT_OF_RANGE): replay the new log from its start, into the store as it is."""
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is not None and position(consumer, tp) > hw:
                log.warning("%s: position %d is beyond the log end %d (the broker lost its "
                            "log); replaying the partition from its start", tp,
                            position(consumer, tp), hw)
                self.stats.log_resets += 1
                consumer.seek(tp, 0)

    def _apply(self, records) -> int:
        """Apply a batch of the log; returns vectors added. Tombstones first: with them, an
        erased crop ends erased whatever the order of its events in the batch."""
        indexed: list[IndexedEvent] = []
        erased: list[ErasedEvent] = []
        for r in records:
            event = self._decode(r)
            if isinstance(event, ErasedEvent):
                erased.append(event)
            elif event is not None:
                indexed.append(event)
        self._tombstone(erased)
        added = self._add(indexed)
        if erased and self.store is not None:
            self.store.remove([e.crop_id for e in erased])
        self._forget_old_tombstones()
        return added

    def _decode(self, record) -> IndexedEvent | ErasedEvent | None:
        try:
            event = parse_index_log(record.value)
        except EventError as exc:
            self.stats.rejected += 1
            log.warning("skipping bad indexed-log event at %s:%d: %s", record.partition,
                        record.offset, exc)
            return None
        if (isinstance(event, IndexedEvent) and self.embedder_version
                and event.embedder_version != self.embedder_version):
            self.stats.rejected += 1  # another embedder's space: not comparable
            return None
        return event

    def _tombstone(self, erased: list[ErasedEvent]) -> None:
        for e in erased:
            at = e.erased_at.timestamp()
            if e.crop_id not in self._erased:
                self.stats.erased += 1
                self._since_snapshot += 1  # the next snapshot must drop the crop
            self._merge_tombstones({e.crop_id: at})

    def _merge_tombstones(self, other: dict[str, float]) -> None:
        for crop_id, at in other.items():
            self._erased[crop_id] = max(at, self._erased.get(crop_id, at))
            self._log_time = max(self._log_time, at)

    def _forget_old_tombstones(self) -> None:
        horizon = self._log_time - _TOMBSTONE_KEEP_S
        if horizon - self._pruned_at >= _TOMBSTONE_PRUNE_S:
            self._erased = {c: t for c, t in self._erased.items() if t >= horizon}
            self._pruned_at = horizon

    def _add(self, events: list[IndexedEvent]) -> int:
        if events:
            self._log_time = max(self._log_time, max(e.indexed_at.timestamp() for e in events))
        live = [e for e in events if e.crop_id not in self._erased]
        self.stats.suppressed += len(events) - len(live)
        events = live
        if not events:
            return 0
        vectors = np.stack([e.vector() for e in events])
        metas = [VectorMeta(crop_id=e.crop_id, camera=e.camera, modality=e.modality,
                            capture_time=e.capture_time.timestamp(), site=e.site,
                            object_key=e.object_key) for e in events]
        with self.lock:
            if self.store is None:
                index = self.settings.index
                self.store = PrefilterStore(vectors.shape[1], exact_max=index.exact_max,
                                            index_kind=index.kind,
                                            target_recall=index.target_recall,
                                            partitions=index.partitions)
                self.embedder_version = events[0].embedder_version
        added = self.store.add(vectors, metas, _colours(events))
        self.stats.applied += added
        self.stats.duplicates += len(events) - added
        if self.keep_latencies:
            now = time.time()
            self.stats.latencies_s.extend(now - m.capture_time for m in metas)
        self._since_snapshot += added
        return added

    def _maybe_snapshot(self) -> None:
        cfg = self.settings.index
        if self._since_snapshot and (
            self._since_snapshot >= cfg.snapshot_every_events
            or time.monotonic() - self._last_snapshot >= cfg.snapshot_every_s
        ):
            if time.monotonic() < self._snapshot_retry_at:
                return
            try:
                self.snapshot()
            except Exception as exc:  # the object store is down: keep following, retry later
                log.warning("snapshot failed (%r); retrying in %.0f s", exc, _SNAPSHOT_RETRY_S)
                self._snapshot_retry_at = time.monotonic() + _SNAPSHOT_RETRY_S

    # -- switching versions ------------------------------------------------------------------------
    def _pending(self) -> IndexFollower | None:
        """The follower of the wanted version, started on first use (polling thread only)."""
        wanted = self._wanted
        if wanted is None or wanted == self.embedder_version:
            return None
        if self._next is None or self._next.embedder_version != wanted:
            if self._next is not None:
                self._next.close()
            self._next = IndexFollower(self.settings, self.objects, embedder_version=wanted,
                                       shard=self.shard)
            try:
                self._next.restore()
            except ValueError:  # a corrupt snapshot: the log alone rebuilds it
                log.exception("snapshot of %s unusable; replaying its log", wanted)
            self._next._merge_tombstones(self._erased)  # erased here: never indexed there
            self._report = None
            log.info("building the index of %s beside %s", wanted, self.embedder_version)
        return self._next

    def _maybe_switch(self) -> bool:
        """Switch to the pending version once its rollout report exists and its store holds
        every live crop (less those the report could not re-embed)."""
        nxt = self._next
        self._checked_at = time.monotonic()
        if nxt is None:
            return False
        if self._report is None:
            assert nxt.embedder_version is not None  # a pending index is for a named version
            self._report = read_report(self.settings, self.objects, nxt.embedder_version)
            if self._report is None:
                return False
        live = self.store.crop_ids() if self.store is not None else set()
        built = nxt.store.crop_ids() if nxt.store is not None else set()
        missing = live - built - set(self._report.unembeddable)
        if missing:
            log.info("index of %s still misses %d of %d crops", nxt.embedder_version,
                     len(missing), len(live))
            return False
        self._switch(nxt)
        return True

    def _switch(self, nxt: IndexFollower) -> None:
        with self.lock:  # readers of active() see the old pair or the new one, never a mix
            old = self.embedder_version
            if self._consumer is not None:
                self._consumer.close()
            self.store, self.embedder_version = nxt.store, nxt.embedder_version
            self._anchors = nxt._anchors  # they describe the log position taken over below
            self._merge_tombstones(nxt._erased)
            self._consumer, nxt._consumer = nxt._consumer, None
            self._next, self._report = None, None
            if self._wanted == nxt.embedder_version:  # not a newer one asked for meanwhile
                self._wanted = None
        self.stats.switches += 1
        log.info("index switched from %s to %s (%d vectors)", old, self.embedder_version,
                 len(self.store) if self.store is not None else 0)
        if self.snapshots and self.store is not None:
            self.snapshot()  # a restart restores the new version, not the old one

    def follow(self, stop: threading.Event) -> None:
        """Tail the log until ``stop`` is set (run in a thread or as the main loop)."""
        while not stop.is_set():
            self.poll()
        self.close()

    def close(self) -> None:
        if self._next is not None:
            self._next.close()
            self._next = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _colours(events: list[IndexedEvent]) -> np.ndarray | None:
    """The events' colour vectors of the current matcher (NaN rows for the others); None
    when no event carries one, so a store of older events holds no colour column."""
    from chatreid.embedder.colour import ColourAttributeMatcher

    version, dim = ColourAttributeMatcher.version, ColourAttributeMatcher().dim
    vectors = [e.colours(dim) if e.colours_version == version else None for e in events]
    if all(v is None for v in vectors):
        return None
    empty = np.full(dim, np.nan, np.float32)
    return np.stack([empty if v is None else v for v in vectors])


def _key(tp: TopicPartition) -> str:
    """How snapshots name a partition (``store.offsets``, anchors)."""
    return f"{tp.topic}:{tp.partition}"
