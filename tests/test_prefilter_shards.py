"""A sharded prefilter tier answers like one index: the merged top-k, newest crops, lookups and
colour vectors equal those of a single store of the same vectors; a shard that is down or
slow fails the query with 503 ``prefilter.shard_unavailable``, never a shorter list; each
shard follows, snapshots and replays only its partitions of the indexed log; and the retrieval
app deployed with shards answers what the unsharded app answers."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import cast

import numpy as np
import pytest

from chatreid.bus import make_producer
from chatreid.errors import ChatReIDError
from chatreid.prefilter import PrefilterStore, SearchFilter, VectorMeta
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.shards import (
    IndexSwitching,
    LocalShard,
    Shard,
    ShardedIndex,
    ShardedStore,
    ShardServer,
    ShardUnavailable,
)
from chatreid.storage import ObjectStore
from schemas import INDEXED, IndexedEvent, SourceOffset

DIM = 16
CAMERAS = [f"cam-{i}" for i in range(7)]


def _world(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    colours = rng.random((n, 5)).astype(np.float32)
    metas = [VectorMeta(crop_id=f"crop-{i:05d}", camera=CAMERAS[i % len(CAMERAS)],
                        modality="rgb" if i % 4 else "infrared",
                        capture_time=1_000_000.0 + float(rng.integers(0, 400)),
                        site="s", object_key=f"crops/{i}.jpg") for i in range(n)]
    return x, metas, colours


def _stores(shards: int):
    """One store of everything, and the same rows split by camera over ``shards`` stores."""
    x, metas, colours = _world()
    whole = PrefilterStore(DIM, index_kind="flat")
    whole.add(x, metas, colours)
    parts = [PrefilterStore(DIM, index_kind="flat") for _ in range(shards)]
    owner = np.array([CAMERAS.index(m.camera) % shards for m in metas])
    for i, part in enumerate(parts):
        rows = np.flatnonzero(owner == i)
        part.add(x[rows], [metas[r] for r in rows], colours[rows])
    return whole, parts, x, metas


def _sharded(parts, version="v1", timeout_s=5.0) -> ShardedIndex:
    clients = [LocalShard(ShardServer(i, lambda p=p: (version, p))) for i, p in enumerate(parts)]
    index = ShardedIndex(clients, timeout_s)
    index.catch_up()
    return index


def test_sharded_search_returns_the_single_index_top_k():
    whole, parts, x, _ = _stores(3)
    index = _sharded(parts)
    version, store = index.active()
    assert version == "v1" and store is not None and len(store) == len(whole)
    queries = x[:12] + 0.3 * np.random.default_rng(1).normal(size=(12, DIM)).astype(np.float32)
    filters = [None, SearchFilter(cameras=frozenset({"cam-1", "cam-5"})),
               SearchFilter(modality="infrared", time_from=1_000_100.0, time_to=1_000_300.0)]
    for f in filters:
        for tau in (None, 0.2):
            merged = store.search(queries, 25, tau=tau, filters=f)
            single = whole.search(queries, 25, tau=tau, filters=f)
            for got, want in zip(merged, single, strict=True):
                assert [h.meta.crop_id for h in got] == [h.meta.crop_id for h in want]
                np.testing.assert_allclose([h.score for h in got], [h.score for h in want],
                                           atol=1e-6)
    # a k larger than any one shard holds still merges every shard's crops
    assert len(store.search(x[0], 500)[0]) == 500


def test_sharded_lookups_newest_similarity_colours_and_cameras_match_one_store():
    whole, parts, x, metas = _stores(3)
    store = _sharded(parts).active()[1]
    assert store is not None
    f = SearchFilter(cameras=frozenset({"cam-0", "cam-2", "cam-3"}))
    exclude = frozenset({metas[0].crop_id, metas[3].crop_id})
    assert store.newest(40, f, exclude) == whole.newest(40, f, exclude)
    ids = [m.crop_id for m in metas[::37]] + ["not-indexed"]
    np.testing.assert_allclose(store.similarity(x[5], ids), whole.similarity(x[5], ids),
                               atol=1e-6)
    np.testing.assert_array_equal(store.colours(ids), whole.colours(ids))
    # the k-reciprocal shortlist reads its candidates' vectors from whichever shard holds them
    np.testing.assert_array_equal(store.vectors(ids), whole.vectors(ids))
    np.testing.assert_allclose(whole.vectors(ids[:1])[0], x[0], atol=1e-6)
    assert np.isnan(store.vectors(ids)[-1]).all()
    assert store.colour_dim == whole.colour_dim == 5
    assert store.get_meta(metas[42].crop_id) == metas[42]
    assert store.get_meta("not-indexed") is None
    cams = {c["camera"]: c for c in store.cameras()}
    assert sum(c["crops"] for c in cams.values()) == len(metas)
    assert cams["cam-0"]["modalities"] == ["infrared", "rgb"]


class _Down:
    """A shard whose actor died: every call fails."""

    def call(self, method, *args):
        future: Future = Future()
        future.set_exception(ConnectionError("actor died"))
        return future


class _Hung:
    """A shard that never answers (a stuck node)."""

    def call(self, method, *args):
        return Future()


def test_a_shard_down_or_hung_fails_the_query_with_503_never_a_short_list():
    _, parts, x, _ = _stores(3)
    healthy = _sharded(parts)
    store = healthy.active()[1]
    assert store is not None
    for broken in (_Down(), _Hung()):
        clients = [*store.clients[:2], broken]
        degraded = ShardedStore(clients, store.infos, "v1", timeout_s=0.2)
        with pytest.raises(ShardUnavailable) as err:
            degraded.search(x[0], 10)
        assert err.value.status == 503 and err.value.code == "prefilter.shard_unavailable"
        assert err.value.retry_after_s and "shard 2 of 3" in err.value.detail
        with pytest.raises(ShardUnavailable):
            degraded.newest(10)
    # a router whose shards never answered says so, not "the gallery is empty"
    with pytest.raises(ShardUnavailable):
        ShardedIndex([_Down()], 0.2).active()


def test_a_query_embedded_for_another_version_is_refused_while_shards_switch():
    _, parts, x, _ = _stores(2)
    clients = [LocalShard(ShardServer(0, lambda: ("v1", parts[0]))),
               LocalShard(ShardServer(1, lambda: ("v2", parts[1])))]
    index = ShardedIndex(clients)
    index.catch_up()
    store = index.active()[1]
    assert store is not None
    with pytest.raises(IndexSwitching) as err:
        store.search(x[0], 10)
    assert isinstance(err.value, ChatReIDError) and err.value.status == 503


def test_shards_split_partitions_evenly_and_refuse_a_shard_without_any():
    assert [p for p in range(6) if Shard(1, 3).owns(p)] == [1, 4]
    assert Shard(0, 1).folder == "" and Shard(2, 4).folder == "shard-2-of-4"
    with pytest.raises(ValueError):
        Shard(3, 3)


# -- on the real broker and object store --------------------------------------------------------

def _events(start: int, n: int, version: str = "v-test") -> list[IndexedEvent]:
    rng = np.random.default_rng(start)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(start, start + n):
        vec = rng.normal(size=DIM).astype(np.float32)
        crop_id = f"crop-{i:05d}"
        out.append(IndexedEvent(
            crop_id=crop_id, vector_id=i + 1, site="s", camera=CAMERAS[i % len(CAMERAS)],
            modality="rgb", capture_time=t0 + timedelta(seconds=i),
            object_key=f"crops/2026-01-01/{crop_id}.jpg", embedder_version=version, dim=DIM,
            vector_b64=IndexedEvent.encode_vector(vec / np.linalg.norm(vec)),
            source=SourceOffset(topic="crops", partition=0, offset=i)))
    return out


def _publish(settings, events: list[IndexedEvent]) -> dict[str, int]:
    """Publish keyed by camera, as the embedders do; returns each crop's partition."""
    producer = make_producer(settings.kafka)
    futures = [(e.crop_id, producer.send(settings.kafka.topic(INDEXED.name),
                                         key=e.camera.encode(), value=e.to_bytes()))
               for e in events]
    producer.flush()
    where = {crop: f.get(timeout=30).partition for crop, f in futures}
    producer.close()
    return where


@pytest.mark.stack
def test_each_shard_follows_snapshots_and_replays_only_its_partitions(settings):
    assert settings.kafka.partitions == 3
    settings.index.shards = 3
    where = _publish(settings, _events(0, 90))
    shards = [IndexFollower(settings, shard=Shard(i, 3), snapshots=True) for i in range(3)]
    for i, follower in enumerate(shards):
        follower.catch_up(timeout_s=60)
        mine = {c for c, p in where.items() if p % 3 == i}
        assert follower.store is not None and follower.store.crop_ids() == mine
        assert follower.stats.read == len(mine)  # never read another shard's records
        key = follower.snapshot()
        assert key and key.startswith(f"{settings.index.snapshot_prefix}/shard-{i}-of-3/")
        follower.close()
    # an unsharded follower beside them snapshots too, and leaves the shards' snapshots alone
    whole = IndexFollower(settings, snapshots=True)
    whole.catch_up(timeout_s=60)
    assert whole.store is not None and len(whole.store) == 90
    whole.snapshot()
    whole.close()
    keys = ObjectStore(settings.s3).list(f"{settings.index.snapshot_prefix}/")
    assert sum(k.endswith(".faiss") for k in keys) == 4
    # more events; a restarted shard 1 restores its snapshot and replays only its part's gap
    later = _publish(settings, _events(90, 45))
    restarted = IndexFollower(settings, shard=Shard(1, 3), snapshots=True)
    assert restarted.restore()
    restarted.catch_up(timeout_s=60)
    new_mine = {c for c, p in later.items() if p % 3 == 1}
    assert restarted.stats.replay_gap == restarted.stats.read == len(new_mine)
    assert restarted.store is not None
    assert restarted.store.crop_ids() == {c for c, p in {**where, **later}.items() if p % 3 == 1}
    restarted.close()


@pytest.mark.stack
def test_a_shard_owning_no_partition_is_refused(settings):
    settings.index.shards = 4  # the test topics have 3 partitions
    follower = IndexFollower(settings, shard=Shard(3, 4))
    with pytest.raises(ValueError, match="owns no partition"):
        follower.catch_up(timeout_s=10)


@pytest.mark.stack
@pytest.mark.slow
def test_the_app_with_shards_answers_like_one_index_and_503s_without_a_shard(settings,
                                                                           ray_session):
    """Deployed with 3 shards on Serve: every query kind's shortlist equals an unsharded
    reader's; a killed shard replica makes queries 503 (or, once Serve has replaced it, full)
    - never a shorter list."""
    import ray
    from ray import serve

    from chatreid.client import ApiError
    from chatreid.prefilter.search import PrefilterSearch
    from chatreid.query import build_shortlist
    from schemas import QueryRequest
    from services.ingestor.sources import synth_source

    from .conftest import deploy_site

    settings.index.shards = 3
    settings.serve.max_turns = 1
    client, ingested = deploy_site(settings, synth_source(3, 60, None, start_time=1.7e9),
                                   port=8013, api_key="shard-key")
    try:
        shards = client.health()["shards"]
        assert [s["shard"] for s in shards] == [0, 1, 2]
        assert sum(s["gallery"] for s in shards) == len(ingested)
        one = PrefilterSearch(settings.model_copy(update={}, deep=True))
        one.refresh()
        query = ingested[0][0].crop_id
        requests = [QueryRequest(crop_id=query, k=12),
                    QueryRequest.model_validate({"kind": "text_to_image", "k": 12,
                                                 "text": "a person in a red top"}),
                    QueryRequest.model_validate({"crop_id": query, "k": 12,
                                                 "filters": {"cameras": ["c2"]}})]
        for request in requests:
            answer = client.query(request)
            want = [c.crop_id for c in build_shortlist(one, request).items]
            assert sorted(r.crop_id for r in answer.results) == sorted(want)
        named = cast(list[dict], ray.util.list_named_actors(all_namespaces=True))
        replicas = [a for a in named if "PrefilterShard1" in a["name"]]
        assert replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
                 no_restart=True)
        want = sorted(c.crop_id for c in build_shortlist(one, requests[0]).items)
        deadline, recovered = time.monotonic() + 120, False
        while not recovered and time.monotonic() < deadline:
            try:
                answer = client.query(requests[0])
            except ApiError as exc:  # the documented answer while the shard is missing
                assert (exc.status, exc.error) == (503, "prefilter.shard_unavailable")
                time.sleep(0.5)
                continue
            assert sorted(r.crop_id for r in answer.results) == want  # never a short list
            recovered = True
        assert recovered, "Serve did not replace the killed shard within 120 s"
    finally:
        serve.shutdown()


@pytest.mark.stack
def test_a_shard_purge_leaves_the_other_shards_images(settings):
    """Retention on a sharded tier: each shard purges its own old crops; the images of crops
    another shard holds are not "never indexed" orphans to it, so they stay."""
    from chatreid.retention import Eraser
    from chatreid.storage import legacy_crop_key, sha256_hex

    from .conftest import jpeg_bytes

    objects = ObjectStore(settings.s3)
    metas = []
    for i in range(4):
        data = jpeg_bytes(color=(10 * i, 5, 5))
        key = legacy_crop_key(sha256_hex(data), "jpg")
        objects.put(key, data)
        metas.append(VectorMeta(crop_id=f"old-{i}", camera=f"cam{i % 2}", modality="rgb",
                                capture_time=1_000.0 + i, site="s", object_key=key))
    time.sleep(1.1)  # last-modified times have whole seconds
    cutoff = datetime.now(UTC)
    assert Eraser(settings, objects).purge(cutoff, metas[:2], orphans=False) == (2, 2)
    assert [objects.exists(m.object_key) for m in metas] == [False, False, True, True]


@pytest.mark.stack
def test_the_embedding_node_keeps_no_whole_index_copy_beside_shards(settings):
    from services.embedder.node import EmbeddingNode

    assert EmbeddingNode(settings, follow_checkpoints=False).follower is not None
    settings.index.shards = 3
    assert EmbeddingNode(settings, follow_checkpoints=False).follower is None


@pytest.mark.stack
def test_cli_erase_and_purge_read_a_sharded_index_one_shard_at_a_time(settings, monkeypatch):
    """`chatreid erase` and `chatreid purge` on a sharded site: each loads one shard's part of
    the index at a time (a 100M-crop index fits no CLI's memory), finds crops on any shard, and
    the purge removes every shard's old crops plus the never-indexed old objects, nothing
    newer."""
    from typer.testing import CliRunner

    from chatreid import retention
    from chatreid.app.cli import app
    from chatreid.retention import index_parts

    from .conftest import env_for, jpeg_bytes

    settings.index.shards = 2
    objects = ObjectStore(settings.s3)
    now = datetime.now(UTC)
    old = _events(0, 20)  # captured in January 2026
    new = [e.model_copy(update={"capture_time": now + timedelta(days=1)})
           for e in _events(100, 6)]
    where = _publish(settings, old + new)
    for e in old + new:
        objects.put(e.object_key, jpeg_bytes())
    stray = "crops/2026-01-01/never-indexed.jpg"  # dead-lettered: stored, never embedded
    objects.put(stray, jpeg_bytes())

    loaded: list[int] = []  # shards loaded, in order; a part is dropped before the next loads
    whole = retention.current_index
    monkeypatch.setattr(retention, "current_index",
                        lambda s, o=None, t=120.0, shard=None: (loaded.append(shard.index),
                                                                 whole(s, o, t, shard))[1])
    parts = index_parts(settings, objects)
    first = next(parts)
    assert loaded == [0]  # lazy: one shard in memory
    ids = [first.crop_ids(), *(p.crop_ids() for p in parts)]
    assert loaded == [0, 1]
    assert ids == [{c for c, p in where.items() if p % 2 == i} for i in range(2)]

    env = {**env_for(settings), "CHATREID_INDEX__SHARDS": "2", "COLUMNS": "300",
           "NO_COLOR": "1"}
    on_1 = next(c for c, p in where.items() if p % 2 == 1 and c.startswith("crop-000"))
    runner = CliRunner()
    result = runner.invoke(app, ["erase", on_1, "no-such-crop", "--reason", "test"], env=env)
    assert result.exit_code == 0, result.output
    assert "erased 1 crops, deleted 1 objects" in result.output
    assert "not indexed, nothing erased: no-such-crop" in result.output
    assert not objects.exists(f"crops/2026-01-01/{on_1}.jpg")

    result = runner.invoke(app, ["purge", "--days", "30"], env=env)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "2026" in line and "│" in line)
    assert [c.strip() for c in row.split("│")[2:5]] == ["25", "19", "19"]
    assert sorted(objects.list("crops/")) == sorted([stray] + [e.object_key for e in new])
    # the stray is older than a cutoff of now: no shard holds it, so it goes; every new crop
    # is held by one shard only, and stays
    time.sleep(1.1)  # last-modified times have whole seconds
    assert retention.Eraser(settings, objects).purge_parts(
        datetime.now(UTC), (p.live_metas() for p in index_parts(settings, objects))) == (0, 1, 6)
    assert sorted(objects.list("crops/")) == sorted(e.object_key for e in new)
    assert set().union(*(p.crop_ids() for p in index_parts(settings, objects))) == {
        e.crop_id for e in new}


@pytest.mark.stack
def test_ingestor_recovery_republishes_only_what_no_shard_holds(settings):
    """After the broker lost crop events, the ingestor republishes every stored crop no shard
    of the index holds, reading the index one shard at a time."""
    from schemas import CROPS, CropEvent
    from services.ingestor import CropInput, Ingestor
    from services.ingestor.service import HeldIds

    from .conftest import jpeg_bytes, read_events

    settings.index.shards = 2
    ingestor = Ingestor(settings, source="test")
    stored = [ingestor.submit(CropInput(data=jpeg_bytes(color=(9 * i, 40, 40)),
                                        camera=CAMERAS[i % len(CAMERAS)],
                                        capture_time=datetime.now(UTC))).event
              for i in range(8)]
    indexed = [e.model_copy(update={"crop_id": s.crop_id, "camera": s.camera})
               for e, s in zip(_events(0, 5), stored[:5], strict=False)]
    where = _publish(settings, indexed)
    assert {p % 2 for p in where.values()} == {0, 1}  # both shards hold some
    assert len(read_events(settings, CROPS, CropEvent, expect=8)) == 8

    assert ingestor.recover() == 3
    ingestor.close()
    seen = Counter(e.crop_id for e in read_events(settings, CROPS, CropEvent, expect=11))
    assert sum(seen.values()) == 11  # the 8 first sent and the 3 again, nothing more
    assert {c for c, n in seen.items() if n == 2} == {e.crop_id for e in stored[5:]}

    held = HeldIds(e.crop_id for e in stored[:5])
    assert len(held) == 5 and all(e.crop_id in held for e in stored[:5])
    assert not any(e.crop_id in held for e in stored[5:])
