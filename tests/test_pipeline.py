"""The live ingest path against the real broker and object store: cameras -> Kafka -> embedder
-> indexed log -> FAISS prefilter store, and its failure modes."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from chatreid.bus import make_producer
from chatreid.prefilter.follower import IndexFollower
from chatreid.storage import ObjectStore, crop_key, sha256_hex
from schemas import CROPS, CropEvent
from services.embedder import EmbedderService
from services.ingestor import CropInput, Ingestor
from services.ingestor.sources import synth_source

from .conftest import env_for, jpeg_bytes, read_dead_letters

pytestmark = pytest.mark.stack


def ingest_synthetic(settings, n: int, seed: int = 0) -> list[CropEvent]:
    ingestor = Ingestor(settings, source="synth")
    events = [ingestor.submit(c).event for c in synth_source(seed, n, None, start_time=1.7e9)]
    ingestor.close()
    assert all(events)
    return events


def follower_caught_up(settings, **kw) -> IndexFollower:
    follower = IndexFollower(settings, **kw)
    follower.catch_up(timeout_s=60)
    return follower



def test_published_crops_are_all_searchable_exactly_once(settings):
    events = ingest_synthetic(settings, 40)
    service = EmbedderService(settings)
    embedder = service.embedder
    stats = service.run(until_idle_s=3)
    assert stats.indexed == 40 and stats.dead_letters == 0

    store = follower_caught_up(settings).store
    assert len(store) == 40
    assert all(e.crop_id in store for e in events)
    # a second reader replaying the whole log sees the same 40, no duplicates
    assert len(follower_caught_up(settings).store) == 40
    # the stored vector is the crop's: its own image finds it first
    objects = ObjectStore(settings.s3)
    for event in events[:3]:
        vec = embedder.embed([Image.open(io.BytesIO(objects.get(event.object_key)))])[0]
        top = store.search(vec, 1)[0][0]
        assert top.meta.crop_id == event.crop_id and top.score > 0.999


def test_embedder_killed_mid_stream_loses_and_duplicates_nothing(settings):
    events = ingest_synthetic(settings, 240, seed=1)
    cmd = [sys.executable, "-m", "chatreid", "embed", "--until-idle", "4", "--no-snapshots"]
    env = {**env_for(settings), "CHATREID_EMBEDDER__BATCH_SIZE": "4"}  # many small commits
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    follower = IndexFollower(settings)
    deadline = time.monotonic() + 120
    while (follower.store is None or len(follower.store) < 30) and time.monotonic() < deadline:
        follower.poll(timeout_ms=200)
    assert proc.poll() is None, "the embedder finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no clean shutdown, no final commit
    proc.wait()
    killed_at = len(follower.store)
    assert 30 <= killed_at < 240

    restarted = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    follower.catch_up(timeout_s=60)
    assert len(follower.store) == 240  # with all present below: exactly the published set
    assert all(e.crop_id in follower.store for e in events)


def test_malformed_events_and_corrupt_images_go_to_dead_letters_rest_is_indexed(settings):
    good = ingest_synthetic(settings, 10, seed=2)
    producer = make_producer(settings.kafka)
    crops_topic = settings.kafka.topic(CROPS.name)
    producer.send(crops_topic, key=b"c1", value=b"{not json")
    producer.send(crops_topic, key=b"c1", value=b'{"kind": "crop", "schema_version": 1}')
    # an event whose object decodes to garbage (stored by someone who skipped validation)
    junk = b"\xff\xd8\xff garbage that is not a jpeg"
    key = crop_key("broken-1", datetime(2026, 1, 1, tzinfo=UTC), "jpg")
    ObjectStore(settings.s3).put(key, junk)
    broken = CropEvent(crop_id="broken-1", site="s", camera="c9",
                       capture_time=datetime(2026, 1, 1, tzinfo=UTC), object_key=key,
                       sha256=sha256_hex(junk), width=64, height=128)
    producer.send(crops_topic, key=b"c9", value=broken.to_bytes())
    producer.flush()
    producer.close()
    # the ingestor refuses a corrupt upload up front
    ingestor = Ingestor(settings, source="test")
    refused = ingestor.submit(CropInput(data=jpeg_bytes()[:100], camera="c2",
                                        capture_time=datetime(2026, 1, 1, tzinfo=UTC),
                                        origin="cam2/frame7.jpg"))
    ingestor.close()
    assert not refused.ok and refused.error == "image.corrupt"

    stats = EmbedderService(settings).run(until_idle_s=3)
    assert stats.indexed == 10 and stats.dead_letters == 3

    letters = read_dead_letters(settings, expect=4)
    by_error = {(d.stage, d.error) for d in letters}
    assert by_error == {("embedder", "event.invalid"), ("embedder", "image.corrupt"),
                        ("ingestor", "image.corrupt")}
    assert all(d.reason for d in letters)
    assert any(d.origin == "cam2/frame7.jpg" and d.payload_b64 for d in letters)
    store = follower_caught_up(settings).store
    assert len(store) == 10 and all(e.crop_id in store for e in good)


def test_snapshot_plus_replay_restores_the_same_search_results(settings):
    ingest_synthetic(settings, 30, seed=3)
    EmbedderService(settings).run(until_idle_s=3)
    first = follower_caught_up(settings, snapshots=False)
    key = first.snapshot()
    assert key is not None
    ingest_synthetic(settings, 20, seed=4)  # the gap after the snapshot
    EmbedderService(settings).run(until_idle_s=3)

    restored = IndexFollower(settings)
    assert restored.restore()
    assert len(restored.store) == 30
    replayed = restored.catch_up(timeout_s=60)
    assert replayed == 20  # only the gap, not the whole log
    # ... read, not merely applied: resuming past the broker's under-reported log end (Tansu)
    # used to replay all 50 records, the 30 the snapshot holds deduplicated
    assert restored.stats.read == restored.stats.replay_gap == 20
    assert restored.stats.log_resets == 0
    full = follower_caught_up(settings)
    queries = np.random.default_rng(0).normal(size=(8, full.store.dim)).astype(np.float32)
    a = restored.store.search(queries, 10)
    b = full.store.search(queries, 10)
    assert [[h.meta.crop_id for h in hits] for hits in a] == [[h.meta.crop_id for h in hits]
                                                               for hits in b]
    assert np.allclose([[h.score for h in hits] for hits in a],
                       [[h.score for h in hits] for hits in b], atol=1e-5)


def test_crop_objects_are_per_crop_and_carry_their_event(settings):
    """Equal bytes from two sightings are two objects (erasing one never touches the other),
    and the object store alone gives back the crop events (a broker that lost its log)."""
    from chatreid.bus import ensure_topics
    from chatreid.storage import META_SHA256
    from services.ingestor.service import republish, stored_events

    events = ingest_synthetic(settings, 6, seed=6)
    ingestor = Ingestor(settings, source="test")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    twins = [ingestor.submit(CropInput(data=jpeg_bytes(), camera=cam, capture_time=at)).event
             for cam in ("c1", "c2")]
    again = ingestor.submit(CropInput(data=jpeg_bytes(), camera="c1", capture_time=at)).event
    ingestor.close()
    assert twins[0].sha256 == twins[1].sha256 and twins[0].object_key != twins[1].object_key
    assert again.crop_id == twins[0].crop_id and again.object_key == twins[0].object_key
    assert twins[0].object_key == f"crops/2026-01-01/{twins[0].crop_id}.jpg"
    objects = ObjectStore(settings.s3)
    published = {e.crop_id: e for e in events + twins}
    assert len(objects.list("crops/")) == len(published)
    assert objects.metadata(twins[1].object_key)[META_SHA256] == twins[1].sha256
    rebuilt = {e.crop_id: e for e in stored_events(objects)}
    assert rebuilt.keys() == published.keys()
    for crop_id, event in rebuilt.items():
        assert event.model_dump(exclude={"ingested_at"}) == \
            published[crop_id].model_dump(exclude={"ingested_at"})

    # the broker lost its log: republished from the object store, indexed once each
    settings.kafka.topic_prefix += "-lost"
    ensure_topics(settings.kafka)
    assert republish(settings) == len(published)
    assert EmbedderService(settings).run(until_idle_s=3).indexed == len(published)
    assert follower_caught_up(settings).store.crop_ids() == published.keys()
