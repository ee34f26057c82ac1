"""The embedding service's pipeline (``embedder.forward_workers``): batches are embedded while
the next is fetched, yet published and committed in poll order, each commit after its batch's
durable write; a bad crop is dead-lettered and the rest of its batch carries on; a store outage
puts back every batch in flight, committing none of them. Fakes stand in for the broker, the
store and the network (no stack needed)."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition
from PIL import Image

import services.embedder.service as service_module
from chatreid.config import Settings
from chatreid.storage import ObjectNotFound, StoreUnavailable, sha256_hex
from schemas import CropEvent, DeadLetterEvent, IndexedEvent
from services.embedder.service import EmbedderService

TOPIC = "t.crops.v1"
TP = TopicPartition(TOPIC, 0)


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 64), (shade, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


class _Store:
    """Objects by key; a key in ``down`` fails as an outage until it is removed."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down: set[str] = set()

    def read(self, key: str) -> tuple[bytes, dict[str, str]]:
        if key in self.down:
            raise StoreUnavailable(f"{key}: connection refused")
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key], {}

    def healthy(self) -> bool:
        return True


class _Future:
    def __init__(self) -> None:
        self.exception = None

    def succeeded(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> None:
        return None


class _Producer:
    """Records every send and flush in one journal shared with the consumer's commits."""

    def __init__(self, journal: list) -> None:
        self.journal = journal

    def send(self, topic: str, key: bytes, value: bytes) -> _Future:
        self.journal.append(("send", topic, value))
        return _Future()

    def flush(self, timeout: float | None = None) -> None:
        self.journal.append(("flush",))

    def close(self, timeout: float | None = None) -> None:
        pass


class _Consumer:
    """Serves ``records`` in polls of up to ``max_records`` from its position; seek moves it."""

    def __init__(self, records: list[ConsumerRecord], journal: list) -> None:
        self.records, self.journal, self.at = records, journal, 0

    def subscribe(self, topics: list[str]) -> None:
        pass

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        batch = self.records[self.at:self.at + (max_records or len(self.records))]
        self.at += len(batch)
        if not batch:
            time.sleep(timeout_ms / 1000)
        return {TP: batch} if batch else {}

    def commit(self, offsets: dict) -> None:
        self.journal.append(("commit", offsets[TP].offset))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.journal.append(("seek", offset))
        self.at = offset

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records)

    def position(self, tp: TopicPartition) -> int:
        return self.at

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    def close(self) -> None:
        pass


class _Embedder:
    """Shade-coded vectors, slow enough that batches overlap; counts forwards in parallel."""

    version, dim = "fake@64x32", 4

    def __init__(self) -> None:
        self.running = self.most = 0
        self.cond = threading.Condition()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        with self.cond:
            self.running += 1
            self.most = max(self.most, self.running)
            self.cond.notify_all()  # a forward lasts until another starts (at most 0.5 s)
            self.cond.wait_for(lambda: self.running > 1, timeout=0.5)
            self.running -= 1
        shades = np.array([np.asarray(img.convert("RGB"))[32, 16, 0] for img in images],
                          np.float32)
        out = np.zeros((len(images), self.dim), np.float32)
        out[:, 0], out[:, 1] = shades, 100.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _site(n: int, store: _Store, corrupt: set[int] = frozenset()) -> list[ConsumerRecord]:  # pyright: ignore[reportArgumentType]
    records = []
    for i in range(n):
        data = b"not an image" if i in corrupt else _jpeg(i)
        key = f"crops/2026-01-01/c{i:03d}.jpg"
        store.objects[key] = data
        event = CropEvent.model_validate({
            "crop_id": f"c{i:03d}", "site": "s", "camera": "cam1", "object_key": key,
            "capture_time": datetime(2026, 1, 1, tzinfo=UTC), "sha256": sha256_hex(data),
            "width": 32, "height": 64})
        records.append(ConsumerRecord(TOPIC, 0, None, i, 0, 0, b"cam1", event.to_bytes(), [],
                                      None, 0, 0, 0))
    return records


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch):
    journal: list = []
    store = _Store()
    box: dict = {}
    monkeypatch.setattr(service_module, "ObjectStore", lambda _s3: store)
    monkeypatch.setattr(service_module, "make_producer", lambda _kafka: _Producer(journal))
    monkeypatch.setattr(service_module, "make_consumer",
                        lambda *_a, **_kw: box.setdefault("consumer", _Consumer([], journal)))
    settings = Settings()
    settings.kafka.topic_prefix = "t"
    settings.embedder.batch_size, settings.embedder.forward_workers = 4, 2
    settings.embedder.poll_timeout_ms, settings.embedder.torch_threads = 20, 1
    settings.embedder.fetch_backoff_initial_s = 0.01

    def make(records: list[ConsumerRecord]) -> tuple[EmbedderService, _Embedder]:
        embedder = _Embedder()
        service = EmbedderService(settings, embedder)
        box["consumer"].records = records
        return service, embedder

    return make, store, journal


def _published(journal: list) -> list[IndexedEvent]:
    return [IndexedEvent.from_bytes(e[2]) for e in journal
            if e[0] == "send" and e[1].endswith("indexed.v1")]


def test_batches_overlap_yet_publish_and_commit_in_poll_order_after_the_durable_write(wired):
    make, store, journal = wired
    records = _site(22, store, corrupt={5, 13})
    service, embedder = make(records)
    stats = service.run(until_idle_s=0.3)

    assert embedder.most == 2  # two batches in their forward pass at once
    indexed = _published(journal)
    assert [e.crop_id for e in indexed] == [f"c{i:03d}" for i in range(22) if i not in (5, 13)]
    assert [e.source.offset for e in indexed] == sorted(e.source.offset for e in indexed)
    # each crop's own vector: shade-coded, so a mix-up between batches would show
    for event in indexed:
        vec = event.vector()
        assert 100 * vec[0] / vec[1] == pytest.approx(int(event.crop_id[1:]), abs=2)
        assert event.colours_b64
    dead = [DeadLetterEvent.from_bytes(e[2]) for e in journal
            if e[0] == "send" and e[1].endswith("deadletter.v1")]
    assert [(d.origin, d.error) for d in dead] == [("c005", "image.corrupt"),
                                                   ("c013", "image.corrupt")]
    commits = [e[1] for e in journal if e[0] == "commit"]
    assert commits == [4, 8, 12, 16, 20, 22]  # every batch, in order
    for offset in commits:  # a batch's commit comes after its events and a flush
        at = journal.index(("commit", offset))
        last_send = max(i for i, e in enumerate(journal[:at]) if e[0] == "send"
                        and (e[1].endswith("deadletter.v1")
                             or IndexedEvent.from_bytes(e[2]).source.offset < offset))
        assert ("flush",) in journal[last_send:at]
    assert (stats.indexed, stats.dead_letters, stats.batches) == (20, 2, 6)


def test_a_store_outage_puts_back_every_batch_in_flight_and_commits_none(wired):
    make, store, journal = wired
    records = _site(12, store)
    store.down.add("crops/2026-01-01/c009.jpg")  # the third batch meets the outage
    service, _ = make(records)
    healthy = store.healthy

    def recovers() -> bool:  # the first health check after the outage: the store is back
        store.down.clear()
        return healthy()

    store.healthy = recovers  # pyright: ignore[reportAttributeAccessIssue]
    stats = service.run(until_idle_s=0.3)

    # batch 1 was committed before batch 3 was polled; batch 2, in flight, went back with it
    first_seek = journal.index(next(e for e in journal if e[0] == "seek"))
    assert [e[1] for e in journal[:first_seek] if e[0] == "commit"] == [4]
    assert journal[first_seek] == ("seek", 4)
    assert [e[1] for e in journal if e[0] == "commit"] == [4, 8, 12]
    crop_ids = [e.crop_id for e in _published(journal)]
    assert sorted(set(crop_ids)) == [f"c{i:03d}" for i in range(12)]
    assert stats.store_waits == 1 and stats.dead_letters == 0


def test_kafka_clients_checksum_record_batches_with_the_c_crc32c():
    """Every producer and consumer checksums each record batch (CRC-32C, verified on fetch).
    kafka-python falls back to a pure-Python CRC without the ``crc32c`` extra: ~1.2 ms per
    7 KB indexed event on each side, more than the index spends applying it."""
    import os

    from kafka.record import util

    assert util.crc32c_c is not None, "install kafka-python[crc32c] (pyproject's dependency)"
    data = memoryview(os.urandom(7000))
    assert util.calc_crc32c(data) == util.crc32c_py(data)
