"""Faults of the servers under the ingest path, on real ones: an object-store outage in the
middle of a stream, and index readers resuming from snapshots against a broker that
under-reports its log end, lost its log, or holds a different one.

The servers these tests stop are their own (a SeaweedFS or Tansu started here on free ports,
in a temporary folder), never the shared local stack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from chatreid.app.stack import tansu_binary, weed_binary
from chatreid.bus import broker_reachable, ensure_topics, make_producer
from chatreid.config import revealed
from chatreid.errors import StorageUnavailable
from chatreid.prefilter import crop_id_to_int64
from chatreid.prefilter.follower import IndexFollower
from chatreid.storage import ObjectStore, StoreUnavailable
from schemas import (
    CROPS,
    INDEXED,
    CropEvent,
    IndexedEvent,
    QueryRequest,
    SourceOffset,
)
from services.embedder import EmbedderService
from services.ingestor import Ingestor
from services.ingestor.sources import synth_source
from services.retrieval.crop_links import CropLinks
from services.retrieval.deployments import PrefilterDeployment

from .conftest import read_dead_letters, read_events

pytestmark = pytest.mark.stack

OUTAGE_S = 30.0


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class PrivateServer:
    """A server process of this test only (own ports, own data), stoppable and restartable."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.env, self.log = cmd, env, log
        self.proc: subprocess.Popen | None = None

    def start(self, healthy, what: str, timeout_s: float = 60) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not healthy():
            assert self.proc.poll() is None, f"{what} exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{what} not healthy in {timeout_s}s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def private_s3(settings, tmp_path):
    """Settings whose object store is a SeaweedFS of this test's own (every port given, so
    none of ``weed mini``'s fixed defaults collides with the shared one)."""
    ports = free_ports(10)
    flags = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"]
    (tmp_path / "s3").mkdir()
    cmd = [weed_binary(), "mini", f"-dir={tmp_path / 's3'}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.telemetry=false",
           *(f"-{flag}={port}" for flag, port in zip(flags, ports, strict=True))]
    env = {"AWS_ACCESS_KEY_ID": settings.s3.access_key.get_secret_value(),
           "AWS_SECRET_ACCESS_KEY": settings.s3.secret_key.get_secret_value()}
    server = PrivateServer(cmd, env, tmp_path / "s3.log")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    server.healthy = healthy
    server.start(healthy, "SeaweedFS")
    s = settings.model_copy(deep=True)
    s.s3.endpoint = f"127.0.0.1:{ports[0]}"
    ObjectStore(s.s3).ensure_bucket()
    try:
        yield s, server
    finally:
        server.stop()


@pytest.fixture
def private_broker(settings, tmp_path):
    """Settings whose broker is a Tansu of this test's own (memory only: a restart loses
    every topic, as the local broker does)."""
    port = free_ports(1)[0]
    url = f"tcp://127.0.0.1:{port}"
    server = PrivateServer([tansu_binary(), "broker", "--listener-url", url,
                            "--advertised-listener-url", url], {}, tmp_path / "kafka.log")
    s = settings.model_copy(deep=True)
    s.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    server.healthy = lambda: broker_reachable(s.kafka)
    server.start(server.healthy, "Tansu")
    ensure_topics(s.kafka)
    try:
        yield s, server
    finally:
        server.stop()


class HeldProducer:
    """Stands in for the ingestor's producer: keeps the events, to publish them later."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes):
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def test_object_store_outage_mid_stream_loses_and_duplicates_nothing(private_s3):
    """The store stops for 30 s while crop events keep arriving: the embedder waits with its
    partitions paused instead of dead-lettering, and indexes every crop once it is back; an
    ingestor meeting the outage waits it out; the API meanwhile answers 503
    storage.unavailable where it needs an image."""
    s, server = private_s3
    s.embedder.batch_size = 8
    s.embedder.fetch_backoff_initial_s, s.embedder.fetch_backoff_max_s = 0.5, 2.0
    crops = list(synth_source(5, 48, None, start_time=1.7e9))
    during = list(synth_source(6, 4, None, start_time=1.7e9))  # sent while the store is down
    ingestor = Ingestor(s, source="synth")
    before = [ingestor.submit(c).event for c in crops[:24]]
    ingestor.close()
    held = HeldProducer()  # the rest is stored now, its events published during the outage
    late = Ingestor(s, source="synth", producer=held)
    after = [late.submit(c).event for c in crops[24:]]
    assert all(before) and all(after) and len(held.sent) == 24

    service = EmbedderService(s)
    worker = threading.Thread(target=service.run, kwargs={"until_idle_s": 120}, daemon=True)
    worker.start()
    follower = IndexFollower(s)
    prefilter = None
    try:
        deadline = time.monotonic() + 60
        while (follower.store is None or len(follower.store) < 24) and \
                time.monotonic() < deadline:
            follower.poll(timeout_ms=200)
        assert follower.store is not None and len(follower.store) == 24
        prefilter = PrefilterDeployment.func_or_class(revealed(s))
        assert prefilter.search.gallery_size() == 24

        server.stop()
        down_until = time.monotonic() + OUTAGE_S
        # an ingestor meeting the outage waits it out (up to store_wait_s), then says so
        hurried = Ingestor(s, source="synth", store_wait_s=0.5)
        with pytest.raises(StoreUnavailable):
            hurried.submit(during[0])
        hurried.close()
        patient = Ingestor(s, source="synth", store_wait_s=90)
        waited: list = []
        writer = threading.Thread(target=lambda: waited.extend(
            patient.submit(c).event for c in during), daemon=True)
        writer.start()
        producer = make_producer(s.kafka)
        for topic, key, value in held.sent:
            assert topic == s.kafka.topic(CROPS.name)
            producer.send(topic, key=key, value=value)
        producer.flush()
        producer.close()
        # meanwhile the API answers a documented 503, not a 500: viewing a crop, querying
        links = CropLinks(s.s3)
        key = prefilter.lookup(before[0].crop_id).object_key
        for call in (lambda: links.link(key, before[0].crop_id),  # GET /v1/crops/{crop_id}
                     lambda: prefilter.shortlist(QueryRequest(crop_id=before[0].crop_id))):
            with pytest.raises(StorageUnavailable) as unavailable:
                call()
            assert (unavailable.value.status, unavailable.value.code) == (503,
                                                                          "storage.unavailable")
        while time.monotonic() < down_until:
            follower.poll(timeout_ms=500)
        assert len(follower.store) == 24  # nothing indexed (nor lost) while the store is down
        assert service.stats.dead_letters == 0 and service.stats.store_waits >= 1

        assert writer.is_alive() and not waited  # still waiting for the store
        server.start(server.healthy, "SeaweedFS (restarted)")
        writer.join(timeout=60)
        patient.close()
        assert len(waited) == 4 and all(waited)
        deadline = time.monotonic() + 60
        while len(follower.store) < 52 and time.monotonic() < deadline:
            follower.poll(timeout_ms=200)
    finally:
        service.stop()
        worker.join(timeout=60)
        follower.close()
        if prefilter is not None:
            prefilter.refresher.stop()
    assert not worker.is_alive()
    stats = service.stats
    everything = before + after + waited
    assert stats.dead_letters == 0 and stats.indexed == 52, stats
    assert follower.store.crop_ids() == {e.crop_id for e in everything}
    indexed = read_events(s, INDEXED, IndexedEvent, expect=53, timeout_s=5)
    assert sorted(e.crop_id for e in indexed) == sorted(e.crop_id for e in everything)
    assert read_dead_letters(s, expect=1, timeout_s=3) == []


def indexed_events(start: int, n: int, dim: int = 8) -> list[IndexedEvent]:
    rng = np.random.default_rng(start)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events = []
    for i in range(start, start + n):
        vec = rng.normal(size=dim).astype(np.float32)
        vec /= np.linalg.norm(vec)
        crop_id = f"crop-{i:04d}"
        events.append(IndexedEvent(
            crop_id=crop_id, vector_id=crop_id_to_int64(crop_id), site="s", camera=f"c{i % 3}",
            modality="rgb", capture_time=t0 + timedelta(seconds=i),
            object_key=f"crops/2026-01-01/{crop_id}.jpg", embedder_version="v-test", dim=dim,
            vector_b64=IndexedEvent.encode_vector(vec),
            source=SourceOffset(topic="crops", partition=0, offset=i)))
    return events


def publish_indexed(s, events: list[IndexedEvent], partitions: list[int],
                    batch: int = 5) -> None:
    """Publish in small flushed batches: multi-record batches are what Tansu under-reports."""
    producer = make_producer(s.kafka)
    for i, (event, partition) in enumerate(zip(events, partitions, strict=True)):
        producer.send(s.kafka.topic(INDEXED.name), key=event.camera.encode(),
                      value=event.to_bytes(), partition=partition)
        if i % batch == batch - 1:
            producer.flush()
    producer.flush()
    producer.close()


def restored(s) -> IndexFollower:
    follower = IndexFollower(s)
    assert follower.restore()
    follower.catch_up(timeout_s=60)
    follower.close()
    return follower


def test_index_readers_resume_from_the_snapshot_whatever_the_broker_reports(private_broker):
    s, broker = private_broker
    assert s.kafka.partitions == 3
    publish_indexed(s, indexed_events(0, 30), [i % 3 for i in range(30)])  # 10 a partition
    first = IndexFollower(s)
    first.catch_up(timeout_s=60)
    assert len(first.store) == 30 and first.snapshot()
    first.close()

    # a restart with nothing new: nothing replayed (the broker reports each partition's end
    # one batch short, which made every reader replay the whole log)
    again = restored(s)
    assert (again.stats.read, again.stats.replay_gap, again.stats.log_resets) == (0, 0, 0)
    assert len(again.store) == 30

    # a gap on one partition only: exactly the gap is replayed
    publish_indexed(s, indexed_events(30, 20), [0] * 20)
    gap = restored(s)
    assert (gap.stats.read, gap.stats.replay_gap, gap.stats.log_resets) == (20, 20, 0)
    assert len(gap.store) == 50

    # the broker restarts and loses its log (memory only); the new log is shorter than the
    # snapshot's offsets: each partition is replayed from its start, the snapshot kept
    broker.stop()
    broker.start(broker.healthy, "Tansu (restarted)")
    ensure_topics(s.kafka)
    publish_indexed(s, indexed_events(100, 9), [i % 3 for i in range(9)])  # 3 a partition
    shorter = restored(s)
    assert (shorter.stats.read, shorter.stats.log_resets) == (9, 3)
    assert len(shorter.store) == 30 + 9

    # ... and once the new log has grown past those offsets, its records there are not the
    # ones the snapshot saw: still replayed from the start, nothing skipped
    publish_indexed(s, indexed_events(200, 30), [i % 3 for i in range(30)])
    grown = restored(s)
    assert (grown.stats.read, grown.stats.log_resets) == (39, 3)
    assert len(grown.store) == 30 + 9 + 30


def test_crop_events_a_restarted_broker_lost_are_published_again(private_broker, tmp_path):
    """Tansu keeps topics in memory: crop events it acknowledged but the embedder had not
    read die with it. The folder source notices (the newest record it had acknowledged is gone,
    even after its own restart) and publishes again what the index does not hold."""
    from services.ingestor.sources import FolderSource

    from .conftest import jpeg_bytes

    s, broker = private_broker
    root = tmp_path / "feed"
    (root / "cam1").mkdir(parents=True)

    def write(first: int, n: int) -> None:
        for i in range(first, first + n):
            (root / "cam1" / f"{i:03d}.jpg").write_bytes(
                jpeg_bytes(color=(20 * i % 256, 40, 255 - 9 * i % 256)))

    def ingest_folder() -> tuple[int, Ingestor]:
        ingestor = Ingestor(s, source="folder")
        results = list(FolderSource(root).publish(ingestor))
        ingestor.close()
        assert all(r.ok for _, r in results)
        return len(results), ingestor

    write(0, 6)
    assert ingest_folder()[0] == 6
    assert EmbedderService(s).run(until_idle_s=3).indexed == 6
    first = IndexFollower(s)
    first.catch_up(timeout_s=60)
    assert first.snapshot() and len(first.store) == 6
    first.close()
    write(6, 4)
    assert ingest_folder()[0] == 4  # acknowledged, not embedded yet

    broker.stop()  # ... and with it every topic
    broker.start(broker.healthy, "Tansu (restarted)")
    ensure_topics(s.kafka)
    published, ingestor = ingest_folder()  # a restarted source: nothing new in the folder
    assert published == 0 and ingestor.published == 0
    # the 4 the index did not hold came back; the 6 of the snapshot were not re-sent
    crops = read_events(s, CROPS, CropEvent, expect=5, timeout_s=5)
    assert len(crops) == 4
    s.embedder.group_id += "-after"  # the old group's offsets died with the broker anyway
    assert EmbedderService(s).run(until_idle_s=3).indexed == 4
    assert len(restored(s).store) == 10
    ingest_folder()  # the log holds them now: nothing more is sent
    assert read_events(s, CROPS, CropEvent, expect=5, timeout_s=3) == crops


def test_an_embedder_running_through_a_broker_restart_loses_nothing(private_broker):
    """After the broker lost its state, the embedder's idempotent producer is refused
    (UnknownProducerId) while flush() raises nothing: the embedder used to commit those
    batches as indexed; now it puts them back and publishes them with a new producer. And a
    consumer whose position lies past the new log's end waited there forever (Tansu answers
    with nothing, not OFFSET_OUT_OF_RANGE): the embedder and a running reader rewind."""
    s, broker = private_broker
    crops = list(synth_source(9, 16, None, start_time=1.7e9))
    ingestor = Ingestor(s, source="synth")
    for crop in crops[:8]:
        ingestor.submit(crop)
    ingestor.close()
    service = EmbedderService(s)
    # the embedder's polls wait while the gate is shut: the new log then grows past the old
    # log's offsets before the embedder looks (it used to resume at its cached commit there)
    gate, polling = threading.Event(), service.consumer.poll
    gate.set()
    service.consumer.poll = lambda **kw: (gate.wait(), polling(**kw))[1]
    worker = threading.Thread(target=service.run, kwargs={"until_idle_s": 120}, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while service.stats.indexed < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert service.stats.indexed == 8
        reader = IndexFollower(s)  # follows the log through the restart
        reader.catch_up(timeout_s=30)
        assert len(reader.store) == 8
        gate.clear()
        time.sleep(1.0)  # the poll under way returns
        broker.stop()
        broker.start(broker.healthy, "Tansu (restarted)")
        ensure_topics(s.kafka)
        ingestor = Ingestor(s, source="synth")
        late = [ingestor.submit(c).event for c in crops[8:]]
        ingestor.close()
        gate.set()
        follower = IndexFollower(s)  # the new log: it must get the 8 crops sent after
        deadline = time.monotonic() + 60
        while (follower.store is None or len(follower.store) < 8) and \
                time.monotonic() < deadline:
            follower.poll(timeout_ms=200)
        follower.close()
        deadline = time.monotonic() + 30  # positions past the new log's end: rewound
        while len(reader.store) < 16 and time.monotonic() < deadline:
            reader.poll(timeout_ms=200)
        reader.close()
    finally:
        service.stop()
        worker.join(timeout=60)
    assert follower.store is not None and follower.store.crop_ids() == {e.crop_id for e in late}
    assert service.stats.dead_letters == 0
    assert len(reader.store) == 16 and reader.stats.log_resets >= 1


def test_a_dead_letter_after_a_broker_restart_is_sent_not_fatal(private_broker):
    """The ingest process used to exit at the first bad crop after a broker restart: its
    idempotent producer was dead for good and the dead-letter send raised. Now the dead
    letter goes through the same producer renewal as crop events; the stream carries on."""
    from services.ingestor import CropInput

    from .conftest import jpeg_bytes

    s, broker = private_broker
    ingestor = Ingestor(s, source="http")
    at = datetime.now(UTC) - timedelta(minutes=5)
    good = CropInput(data=jpeg_bytes(), camera="cam1", capture_time=at)
    assert ingestor.submit(good).ok
    ingestor.flush()
    broker.stop()
    broker.start(broker.healthy, "Tansu (restarted)")
    ensure_topics(s.kafka)
    bad = CropInput(data=b"not an image", camera="cam1", capture_time=at, origin="http:x")
    assert not ingestor.submit(bad).ok  # no exception: the reason reached the broker
    assert [d.origin for d in read_dead_letters(s, expect=1)] == ["http:x"]
    again = CropInput(data=jpeg_bytes(color=(1, 2, 3)), camera="cam1", capture_time=at)
    assert ingestor.submit(again).ok
    ingestor.flush()
    ingestor.close()
