"""Embedder releases as the index sees them: the ``checkpoints`` topic's embedder checkpoints,
pulled and verified, and the one to serve (the newest whose index rebuild finished). Here, in
the prefilter, because it reads the rebuild reports (``chatreid.prefilter.rebuild``).

The topic is the rollout log (keyed by model kind, so one partition holds every embedder
checkpoint in push order). Whoever embeds - the embedding service, the search side - follows
it with a :class:`CheckpointWatcher`:

* :meth:`~CheckpointWatcher.resolve` at start-up: the embedder to serve (the newest checkpoint
  whose index rebuild finished, else the configured one) and the release to move to, if a
  newer one is still being rolled out;
* :meth:`~CheckpointWatcher.poll` then :meth:`~CheckpointWatcher.load` for new checkpoints.

Loading pulls the files and verifies the manifest and every sha256 (``checkpoints.pull``), then
builds the embedder (torch or ONNX: :func:`~chatreid.embedder.load_embedder`) at its input
size and checks that its version is the event's. A checkpoint failing any of that is refused -
logged, and dead-lettered when the watcher is the service's - and the caller keeps the embedder
it has.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord

from chatreid.bus import (
    dead_letter,
    end_offsets,
    make_producer,
    position,
    read_from_start,
    topic_id,
)
from chatreid.checkpoints import CheckpointError, pull
from chatreid.config import Settings
from chatreid.embedder.embedder import WeightsError
from chatreid.embedder.load import AnyEmbedder, load_embedder
from chatreid.prefilter.rebuild import read_report
from chatreid.storage import ObjectNotFound, ObjectStore
from schemas import CHECKPOINTS, CheckpointEvent, DeadLetterEvent, EventError, SourceOffset

__all__ = ["CheckpointWatcher", "Release", "Sighted"]

log = logging.getLogger(__name__)

MODEL = "embedder"


@dataclass(frozen=True)
class Sighted:
    """An embedder checkpoint event as read from the topic, not loaded yet."""

    event: CheckpointEvent
    source: SourceOffset
    raw: bytes


@dataclass(frozen=True)
class Release:
    """A verified embedder checkpoint, loaded and ready to embed."""

    event: CheckpointEvent
    source: SourceOffset
    embedder: AnyEmbedder

    @property
    def version(self) -> str:
        return self.embedder.version


class CheckpointWatcher:
    """Follows ``checkpoints`` from the beginning for embedder checkpoints (no consumer group:
    every replica sees every release)."""

    def __init__(self, settings: Settings, *, objects: ObjectStore | None = None,
                 dead_letters: bool = True) -> None:
        self.settings = settings
        self.objects = objects or ObjectStore(settings.s3)
        self.topic = settings.kafka.topic(CHECKPOINTS.name)
        self.dead_letters = dead_letters  # the service reports refusals; readers only log
        # manifest sha256 -> why: a re-push of the same version is a new event and is retried
        self.refused: dict[str, str] = {}
        self._consumer: KafkaConsumer | None = None
        self._producer = None
        self._topic_id = None  # the topic's identity when opened (a recreated topic: re-read)

    # -- reading the topic -------------------------------------------------------------------
    def _open(self) -> KafkaConsumer:
        if self._consumer is None:
            consumer = read_from_start(self.settings.kafka, self.topic)
            self._consumer = consumer
            self._topic_id = topic_id(consumer, self.topic)
        return self._consumer

    def poll(self, timeout_ms: int = 0) -> list[Sighted]:
        """Embedder checkpoint events published since the last call, oldest first."""
        consumer = self._open()
        now = topic_id(consumer, self.topic)
        if now is not None and now != self._topic_id:
            if self._topic_id is not None:  # recreated: the broker lost its log, read the new
                log.warning("%s was recreated; reading it from its start", self.topic)
                consumer.seek_to_beginning()
            self._topic_id = now
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=100)
        records = sorted((r for batch in polled.values() for r in batch),
                         key=lambda r: (r.partition, r.offset))
        return [s for s in map(self._sighted, records) if s is not None]

    def catch_up(self, timeout_s: float = 30.0) -> list[Sighted]:
        """Everything on the topic up to now (see ``IndexFollower.catch_up`` on end offsets)."""
        consumer = self._open()
        ends = end_offsets(consumer, consumer.assignment())
        found: list[Sighted] = []
        deadline = time.monotonic() + timeout_s
        while True:
            behind = any(position(consumer, tp) < end for tp, end in ends.items())
            batch = self.poll(timeout_ms=200)
            found += batch
            if not batch and not behind:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic} not read to its end within {timeout_s}s")

    def _sighted(self, record: ConsumerRecord) -> Sighted | None:
        source = SourceOffset(topic=record.topic, partition=record.partition,
                              offset=record.offset)
        try:
            event = CheckpointEvent.from_bytes(record.value)
        except EventError as exc:
            if record.key == MODEL.encode():  # meant for us, but unreadable
                self._dead(None, source, record.value, "checkpoint.invalid", str(exc))
            return None
        return Sighted(event, source, record.value) if event.model == MODEL else None

    # -- loading -----------------------------------------------------------------------------
    def load(self, sighted: Sighted) -> Release | None:
        """Pull, verify and build; ``None`` (refused, reported) when anything does not match."""
        event, cfg = sighted.event, self.settings.embedder
        with tempfile.TemporaryDirectory(prefix="chatreid-embedder-") as tmp:
            try:
                pull(self.settings, event, Path(tmp))
                embedder = load_embedder(Path(tmp), device=cfg.device,
                                         batch_size=cfg.batch_size, threads=cfg.torch_threads)
            except CheckpointError as exc:
                self._refuse(sighted, "checkpoint.corrupt", str(exc))
                return None
            except ObjectNotFound as exc:
                self._refuse(sighted, "checkpoint.missing", f"object {exc} not found")
                return None
            except (WeightsError, ValueError, KeyError) as exc:
                self._refuse(sighted, "checkpoint.invalid", str(exc))
                return None
        if embedder.version != event.version:
            self._refuse(sighted, "checkpoint.invalid", f"the weights load as version "
                         f"{embedder.version!r}, the event says {event.version!r}")
            return None
        log.info("embedder checkpoint %s verified and loaded (dim %d)", event.version,
                 embedder.dim)
        return Release(event, sighted.source, embedder)

    def newest(self, sighted: list[Sighted]) -> Release | None:
        """The newest of ``sighted`` that loads (older ones are superseded, not loaded)."""
        for s in reversed(sighted):
            if s.event.manifest_sha256 in self.refused and s.event.forced is None:
                continue  # refused once (corrupt, or by the gate) unless forced since
            release = self.load(s)
            if release is not None:
                return release
        return None

    def resolve(self, default: Callable[[], AnyEmbedder]) -> tuple[AnyEmbedder, Release | None]:
        """(embedder to serve now, release still being rolled out or ``None``).

        Serve the newest checkpoint whose index rebuild finished (it has a rollout report),
        else ``default()``; move to the newest checkpoint after it, if any loads.
        """
        sighted = self.catch_up()
        done = [i for i, s in enumerate(sighted)
                if read_report(self.settings, self.objects, s.event.version) is not None]
        current: AnyEmbedder | None = None
        later = sighted
        for i in reversed(done):
            release = self.load(sighted[i])
            if release is not None:
                current, later = release.embedder, sighted[i + 1 :]
                break
        current = current or default()
        pending = self.newest([s for s in later if s.event.version != current.version])
        return current, pending

    # -- refusals ----------------------------------------------------------------------------
    def _refuse(self, sighted: Sighted, error: str, reason: str) -> None:
        self.refused[sighted.event.manifest_sha256] = reason
        self._dead(sighted.event.version, sighted.source, sighted.raw, error, reason)

    def _dead(self, version: str | None, source: SourceOffset, raw: bytes, error: str,
              reason: str) -> None:
        log.error("refusing embedder checkpoint %s: %s (%s); keeping the current embedder",
                  version or "<unreadable>", reason, error)
        if not self.dead_letters:
            return
        if self._producer is None:
            self._producer = make_producer(self.settings.kafka)
        dead_letter(self._producer, self.settings.kafka, DeadLetterEvent(
            stage="embedder", error=error, reason=reason, origin=version, source=source,
            **DeadLetterEvent.wrap_payload(raw)))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None
