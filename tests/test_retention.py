"""Right to erasure and retention against the real broker and object store: erased crops leave
every index (followers, snapshots, restores from older snapshots, a rollout's index), stay out
when their index events come back, and lose their images; purges remove exactly the old."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

from chatreid.app.cli import app
from chatreid.bus import make_producer
from chatreid.config import revealed
from chatreid.prefilter import SearchFilter
from chatreid.prefilter.follower import IndexFollower
from chatreid.retention import RETENTION, Eraser, current_index
from chatreid.storage import ObjectStore, legacy_crop_key, sha256_hex
from schemas import INDEXED, CropEvent, ErasedEvent, IndexedEvent, parse_index_log
from services.embedder import EmbedderService
from services.ingestor import CropInput, Ingestor

from .conftest import env_for, jpeg_bytes, read_dead_letters, read_events

pytestmark = pytest.mark.stack

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NEXT = "v-next"  # an embedder being rolled out


class IndexLog:
    """read_events' model for the indexed log, which carries both event kinds."""

    from_bytes = staticmethod(parse_index_log)


def colour(i: int) -> tuple[int, int, int]:
    return (21 * i % 256, 255 - 19 * i % 256, 40 + 13 * i % 200)


def ingest(settings, crops: list[tuple[int, str, datetime]]) -> list[CropEvent]:
    """(colour index, camera, capture time) -> published crops; equal colours share bytes."""
    ingestor = Ingestor(settings, source="test")
    results = [ingestor.submit(CropInput(data=jpeg_bytes(color=colour(i)), camera=camera,
                                         capture_time=at)) for i, camera, at in crops]
    ingestor.close()
    assert all(r.ok for r in results)
    return [r.event for r in results]


def embed(settings) -> None:
    stats = EmbedderService(settings).run(until_idle_s=3)
    assert stats.dead_letters == 0


def caught_up(settings, **kw) -> IndexFollower:
    follower = IndexFollower(settings, **kw)
    follower.catch_up(timeout_s=60)
    return follower


def publish_raw(settings, events: list[IndexedEvent]) -> None:
    producer = make_producer(settings.kafka)
    for e in events:
        producer.send(settings.kafka.topic(INDEXED.name), key=e.camera.encode(),
                      value=e.to_bytes())
    producer.flush()
    producer.close()


def holds_none(follower: IndexFollower, crop_ids: set[str], size: int) -> None:
    assert follower.store is not None and len(follower.store) == size
    assert not crop_ids & follower.store.crop_ids()


def test_erasure_reaches_every_index_and_sticks(settings):
    events = ingest(settings, [(i, f"cam{i % 2}", T0 + timedelta(minutes=i)) for i in range(12)])
    embed(settings)
    indexed = {e.crop_id: e for e in read_events(settings, INDEXED, IndexLog, expect=12)}
    assert len(indexed) == 12
    # a rollout's re-embedding in progress: the next version's index holds every crop too
    publish_raw(settings, [e.model_copy(update={"embedder_version": NEXT})
                           for e in indexed.values()])
    live = caught_up(settings)
    rollout = caught_up(settings, embedder_version=NEXT)
    assert len(live.store) == len(rollout.store) == 12
    old_snapshot = live.snapshot()
    stale = IndexFollower(settings)
    assert stale.restore() and len(stale.store) == 12  # restored before the erasure

    objects = ObjectStore(settings.s3)
    doomed = [events[0], events[5]]  # one per camera
    gone = {e.crop_id for e in doomed}
    first = live.store.get_meta(doomed[0].crop_id)
    assert Eraser(settings, objects).erase([first], "erasure", "req-1") == ([first.crop_id], 1)
    assert Eraser(settings, objects).erase([first], "erasure", "req-1") == ([first.crop_id], 0)
    # the CLI erases the other one and reports what the index does not hold, without failing
    result = CliRunner().invoke(
        app, ["erase", doomed[1].crop_id, "no-such-crop", first.crop_id, "--reason", "erasure"],
        env={**env_for(settings), "COLUMNS": "300", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "erased 1 crops, deleted 1 objects" in result.output
    assert "no-such-crop" in result.output.split("not indexed")[1]
    assert first.crop_id in result.output.split("not indexed")[1]

    for e in events:
        assert objects.exists(e.object_key) == (e.crop_id not in gone)
    live.catch_up(timeout_s=60)
    holds_none(live, gone, 10)
    assert live.stats.erased == 2
    queries = np.stack([indexed[c].vector() for c in sorted(gone)])
    for filters in (None, SearchFilter(cameras=frozenset({"cam0", "cam1"}))):
        for hits in live.store.search(queries, 12, filters=filters):
            assert len(hits) == 10 and not gone & {h.meta.crop_id for h in hits}
    rollout.catch_up(timeout_s=60)  # an erasure applies to every embedder version
    holds_none(rollout, gone, 10)
    stale.catch_up(timeout_s=60)  # older snapshot + replay of the log
    holds_none(stale, gone, 10)

    # a snapshot taken now does not hold them, and it replaced the older one
    new_snapshot = live.snapshot()
    assert not objects.exists(old_snapshot)
    data = objects.get(new_snapshot)
    assert not any(c.encode() in data for c in gone)
    restored = IndexFollower(settings)
    assert restored.restore()
    holds_none(restored, gone, 10)

    # index events of the erased crops after their tombstones (a late batch, a rollout
    # re-embed) are ignored, by running followers and by ones restored from the new snapshot
    late = [indexed[c] for c in sorted(gone)]
    publish_raw(settings, late + [e.model_copy(update={"embedder_version": NEXT}) for e in late])
    for follower in (live, rollout, restored):
        follower.catch_up(timeout_s=60)
        holds_none(follower, gone, 10)
        assert follower.stats.suppressed == 2
    holds_none(caught_up(settings), gone, 10)  # the whole log from the start

    # an embedder replaying the crops topic (a new group) dead-letters the erased crops
    settings.embedder.group_id += "-replay"
    replay = EmbedderService(settings).run(until_idle_s=3)
    assert replay.indexed == 10 and replay.dead_letters == 2
    letters = read_dead_letters(settings, expect=2)
    assert {(d.error, d.origin) for d in letters} == {("crop.missing", c) for c in gone}
    live.catch_up(timeout_s=60)
    holds_none(live, gone, 10)

    tombstones = [e for e in read_events(settings, INDEXED, IndexLog, expect=41)
                  if isinstance(e, ErasedEvent)]
    assert sorted(e.crop_id for e in tombstones) == sorted([first.crop_id, *gone])
    assert {(e.reason, e.camera) for e in tombstones} == {("erasure", "cam0"), ("erasure", "cam1")}


def test_purge_removes_exactly_the_older_crops_and_objects(settings):
    objects = ObjectStore(settings.s3)
    stray = jpeg_bytes(color=(1, 2, 3))  # stored long ago, never indexed (a dead letter, say)
    stale_stray = legacy_crop_key(sha256_hex(stray), "jpg")
    objects.put(stale_stray, stray)
    time.sleep(2.1)  # last-modified times have whole seconds
    cutoff = datetime.now(UTC)
    time.sleep(1.1)
    fresh = jpeg_bytes(color=(4, 5, 6))  # unindexed too, but newer than the cutoff
    fresh_stray = legacy_crop_key(sha256_hex(fresh), "jpg")
    objects.put(fresh_stray, fresh)
    old = ingest(settings, [(i, f"cam{i % 2}", cutoff - timedelta(days=40, minutes=i))
                            for i in range(6)])
    # colour 5 again: a newer sighting with the old crop's bytes, whose image must stay
    new = ingest(settings, [(i, f"cam{i % 2}", cutoff + timedelta(seconds=1 + 10 * i))
                            for i in range(5, 11)])  # within the ingestor's clock skew
    assert old[5].object_key != new[0].object_key  # one object per crop, equal bytes or not
    embed(settings)

    eraser = Eraser(settings, objects)
    with pytest.raises(ValueError, match="timezone"):
        eraser.purge(cutoff.replace(tzinfo=None), [])
    metas = current_index(settings, objects).live_metas()
    assert len(metas) == 12
    assert eraser.purge(cutoff, metas) == (6, 7)  # 6 old objects + the stale stray

    index = current_index(settings, objects)
    assert index.crop_ids() == {e.crop_id for e in new}
    assert not objects.exists(stale_stray) and objects.exists(fresh_stray)
    for e in old:
        assert not objects.exists(e.object_key)
    for e in new:
        assert objects.exists(e.object_key)
    assert eraser.purge(cutoff, index.live_metas()) == (0, 0)  # nothing left to purge
    tombstones = [e for e in read_events(settings, INDEXED, IndexLog, expect=18)
                  if isinstance(e, ErasedEvent)]
    assert sorted(e.crop_id for e in tombstones) == sorted(e.crop_id for e in old)
    assert {e.reason for e in tombstones} == {RETENTION}

    # the CLI purges with --days and prints what it removed
    result = CliRunner().invoke(app, ["purge", "--days", "1"],
                                env={**env_for(settings), "COLUMNS": "300", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "retention purge (1 days)" in result.output


def test_erasing_a_crop_never_breaks_another_with_the_same_bytes(settings):
    """Two sightings with identical bytes (a static scene, a re-sent frame) used to share one
    content-addressed object: erasing one deleted the other's image (GET /v1/crops/B -> 500,
    queries with B -> 500, B still in the gallery)."""
    import urllib.request

    from chatreid.errors import CropGone
    from schemas import QueryRequest
    from services.retrieval.crop_links import CropLinks
    from services.retrieval.deployments import PrefilterDeployment

    a, b, c = ingest(settings, [(7, "cam0", T0), (7, "cam1", T0 + timedelta(minutes=1)),
                                (8, "cam0", T0 + timedelta(minutes=2))])
    assert a.sha256 == b.sha256 and len({a.object_key, b.object_key, c.object_key}) == 3
    objects = ObjectStore(settings.s3)
    # legacy events (ingested before per-crop keys) pointing at one content-addressed object
    shared = legacy_crop_key(a.sha256, "jpg")
    objects.put(shared, objects.get(a.object_key))
    legacy = [e.model_copy(update={"crop_id": f"legacy-{n}", "object_key": shared})
              for n, e in enumerate((a, b))]
    producer = make_producer(settings.kafka)
    for e in legacy:
        producer.send(settings.kafka.topic("crops.v1"), key=e.camera.encode(), value=e.to_bytes())
    producer.flush()
    producer.close()
    embed(settings)
    prefilter = PrefilterDeployment.func_or_class(revealed(settings))
    links = CropLinks(settings.s3, objects)

    def crop(crop_id: str) -> tuple[bytes, str]:  # what GET /v1/crops/{crop_id} leads to
        with urllib.request.urlopen(links.link(prefilter.lookup(crop_id).object_key,
                                               crop_id)) as answer:
            return answer.read(), answer.headers["Content-Type"]

    try:
        assert prefilter.search.gallery_size() == 5
        result = prefilter.erase([a.crop_id, "legacy-0"], "erasure", "req-shared")
        assert sorted(result["erased"]) == sorted([a.crop_id, "legacy-0"])
        assert result["objects_deleted"] == 1  # A's own; the legacy object legacy-1 still uses
        assert not objects.exists(a.object_key)
        assert objects.exists(b.object_key) and objects.exists(shared)
        data, content_type = crop(b.crop_id)
        assert data == objects.get(b.object_key) and content_type == "image/jpeg"
        assert crop("legacy-1")[0] == data
        shortlist = prefilter.shortlist(QueryRequest(crop_id=b.crop_id, k=5))
        assert {i.crop_id for i in shortlist.items} == {"legacy-1", c.crop_id}
        # the last crop naming the legacy object takes it along (the CLI loads the index)
        assert Eraser(settings, objects).erase(
            [prefilter.lookup("legacy-1")], "erasure", "req-legacy") == (["legacy-1"], 1)
        assert not objects.exists(shared)

        # an indexed crop whose image vanished anyway (deleted by hand, a racing erasure) is
        # a documented 410, not a 500: viewing it, querying with it
        objects.delete(c.object_key)
        for call in (lambda: crop(c.crop_id),
                     lambda: prefilter.shortlist(QueryRequest(crop_id=c.crop_id, k=5))):
            with pytest.raises(CropGone) as gone:
                call()
            assert (gone.value.status, gone.value.code) == (410, "crop.gone")
    finally:
        prefilter.refresher.stop()


def test_erasure_and_purge_delete_the_crops_cached_vision_features(settings):
    """Rerank caches each gallery crop's ViT output under every encoder version; those are
    derived from the person's image and go with it."""
    objects = ObjectStore(settings.s3)
    events = ingest(settings, [(i, "cam0", datetime(2026, 1, 1, tzinfo=UTC) + timedelta(i))
                               for i in range(3)])
    embed(settings)
    features = [f"vision-cache/{v}/{e.object_key}" for v in ("enc-a", "enc-b") for e in events]
    for key in features:
        objects.put(key, b"features")
    metas = current_index(settings, objects).live_metas()
    by_id = {m.crop_id: m for m in metas}
    Eraser(settings, objects).erase([by_id[events[0].crop_id]], "request", "r-1")
    left = set(objects.list("vision-cache/"))
    assert left == {k for k in features if events[0].object_key not in k}
    late = f"vision-cache/enc-a/{events[0].object_key}"  # a rerank in flight wrote it back
    objects.put(late, b"features")
    Eraser(settings, objects).purge(datetime(2026, 1, 2, 12, tzinfo=UTC), metas)
    assert set(objects.list("vision-cache/")) == {k for k in features
                                                 if events[2].object_key in k}
