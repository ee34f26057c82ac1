"""The prefilter store: ids, cosine/tau, filters, exact vs approximate, snapshots, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from chatreid.prefilter import (
    PrefilterStore,
    SearchFilter,
    VectorMeta,
    crop_id_to_int64,
)

DIM = 32


def clustered(n: int, dim: int = DIM, identities: int = 200, noise: float = 0.35,
              seed: int = 0) -> np.ndarray:
    """Identity centres plus per-sample noise, like person embeddings (not normalised)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim))
    labels = rng.integers(0, identities, n)
    return (centres[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32)


def metas_for(n: int, start: int = 0, cameras: int = 4) -> list[VectorMeta]:
    return [VectorMeta(crop_id=f"crop-{i}", camera=f"cam{i % cameras}",
                       modality="infrared" if i % 5 == 0 else "rgb", capture_time=float(i),
                       site="s1", object_key=f"crops/{i}.jpg")
            for i in range(start, start + n)]


def filled(n: int, **kwargs) -> tuple[PrefilterStore, np.ndarray]:
    x = clustered(n)
    store = PrefilterStore(DIM, **kwargs)
    assert store.add(x, metas_for(n)) == n
    return store, x


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def hit_ids(hits) -> list[int]:
    return [h.id for h in hits]


# -- ids -------------------------------------------------------------------------------------


def test_crop_id_hash_is_sha256_prefix_as_int63() -> None:
    expected = int.from_bytes(hashlib.sha256(b"cam1/000123.jpg").digest()[:8], "big") & (2**63 - 1)
    assert crop_id_to_int64("cam1/000123.jpg") == expected
    assert 0 <= crop_id_to_int64("x") < 2**63


def test_ids_are_stable_across_processes() -> None:
    names = ["a", "crop-1", "cam7/2024-01-01T00:00:00Z/42", "ünïcode"]
    code = ("import json,sys; from chatreid.prefilter import crop_id_to_int64 as h; "
            "print(json.dumps([h(n) for n in json.loads(sys.argv[1])]))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == [crop_id_to_int64(n) for n in names]


# -- adds ------------------------------------------------------------------------------------


def test_add_is_idempotent_by_crop_id() -> None:
    store, x = filled(100)
    report = store.add_with_report(x, metas_for(100))
    assert report.added == 0 and len(report.skipped) == 100 and len(store) == 100
    # a batch repeating an id and mixing old and new ids: only the first new one counts
    batch = np.concatenate([x[:2], x[:2]])
    metas = [metas_for(1, 0)[0], metas_for(1, 500)[0], metas_for(1, 500)[0], metas_for(1, 1)[0]]
    report = store.add_with_report(batch, metas)
    assert report.added == 1 and sorted(report.skipped) == ["crop-0", "crop-1", "crop-500"]
    assert len(store) == 101 and "crop-500" in store
    ids = hit_ids(store.search(x[0], 200)[0])
    assert len(ids) == len(set(ids)) == 101


def test_add_keeps_first_vector_and_meta_for_an_id() -> None:
    store = PrefilterStore(4)
    store.add(np.eye(4, dtype=np.float32)[:1], [VectorMeta("a", "c1", "rgb", 1.0)])
    store.add(np.eye(4, dtype=np.float32)[1:2], [VectorMeta("a", "c2", "infrared", 2.0)])
    assert store.get_meta("a") == VectorMeta("a", "c1", "rgb", 1.0)
    assert store.search(np.eye(4)[0], 1)[0][0].score == pytest.approx(1.0)


# -- cosine and tau --------------------------------------------------------------------------


def hand_made() -> PrefilterStore:
    store = PrefilterStore(4)
    vectors = np.array([[5, 0, 0, 0], [3, 3, 0, 0], [0, 2, 0, 0], [-1, 0, 0, 0]], np.float32)
    store.add(vectors, [VectorMeta(n, "c", "rgb", 0.0) for n in ("same", "diag", "orth", "opp")])
    return store


def test_scores_are_cosine_sorted_descending() -> None:
    hits = hand_made().search(np.array([7.0, 0, 0, 0]), 10)[0]
    assert [h.meta.crop_id for h in hits] == ["same", "diag", "orth", "opp"]
    assert [h.score for h in hits] == pytest.approx([1.0, 2**-0.5, 0.0, -1.0], abs=1e-6)
    assert hits[0].id == crop_id_to_int64("same")


def test_tau_keeps_only_scores_at_or_above_it_and_k_caps() -> None:
    store = hand_made()
    q = np.array([1.0, 0, 0, 0], np.float64)
    assert [h.meta.crop_id for h in store.search(q, 10, tau=0.7)[0]] == ["same", "diag"]
    assert [h.meta.crop_id for h in store.search(q, 10, tau=0.0)[0]] == ["same", "diag", "orth"]
    assert [h.meta.crop_id for h in store.search(q, 10, tau=1.0)[0]] == ["same"]
    assert store.search(q, 10, tau=1.0 + 1e-6)[0] == []
    assert [h.meta.crop_id for h in store.search(q, 1, tau=-1.0)[0]] == ["same"]


def test_query_shapes_and_empty_store() -> None:
    assert PrefilterStore(DIM).search(np.ones(DIM), 5) == [[]]
    store, x = filled(50)
    assert len(store.search(x[0], 5)) == 1
    assert [len(h) for h in store.search(x[:3], 5)] == [5, 5, 5]


# -- filters ---------------------------------------------------------------------------------


def far_matches_store(kind: str, exact_max: int | None = None) -> tuple[PrefilterStore,
                                                                         np.ndarray]:
    """3000 vectors near the query on cam0/rgb/t<1000 plus 40 far ones that match the filters."""
    rng = np.random.default_rng(3)
    q = unit(rng.standard_normal(DIM))
    near = q + 0.2 * rng.standard_normal((3000, DIM))
    far = -q + 0.5 * rng.standard_normal((40, DIM))
    metas = [VectorMeta(f"n{i}", "cam0", "rgb", float(i % 1000)) for i in range(3000)]
    metas += [VectorMeta(f"f{i}", "cam9", "infrared", 5000.0 + i) for i in range(40)]
    store = PrefilterStore(DIM, index_kind=kind, exact_max=exact_max)  # type: ignore[arg-type]
    store.add(np.concatenate([near, far]).astype(np.float32), metas)
    return store, q


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("filters", [
    SearchFilter(cameras=frozenset({"cam9", "nope"})),
    SearchFilter(modality="infrared"),
    SearchFilter(time_from=5000.0, time_to=6000.0),
])
@pytest.mark.parametrize("exact_max", [None, 10])  # 10: the approximate index sees the filter
def test_filters_apply_before_top_k(kind: str, filters: SearchFilter,
                                    exact_max: int | None) -> None:
    store, q = far_matches_store(kind, exact_max)
    assert store.active_kind == kind
    assert all(h.meta.camera == "cam0" for h in store.search(q, 30)[0])  # unfiltered top-k
    for queries in (q, np.stack([q] * 9)):  # single-query and batched code paths
        for hits in store.search(queries, 30, filters=filters):
            assert len(hits) == 30
            assert all(h.meta.camera == "cam9" for h in hits)
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
    exact = store.search(q, 30, filters=filters, exact=True)[0]
    assert hit_ids(store.search(q, 30, filters=filters)[0]) == hit_ids(exact)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_broad_filters_on_the_approximate_index_match_exact(kind: str) -> None:
    store, _ = filled(6000, index_kind=kind, exact_max=100)
    f = SearchFilter(cameras=frozenset({"cam1"}), time_from=1000.0)
    queries = clustered(20, seed=5)
    approx = store.search(queries, 20, filters=f)
    exact = store.search(queries, 20, filters=f, exact=True)
    assert all(len(h) == 20 for h in approx)
    assert all(h.meta.camera == "cam1" and h.meta.capture_time >= 1000 for a in approx for h in a)
    recall = np.mean([len(set(hit_ids(a)) & set(hit_ids(e))) / 20
                      for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_filters_combine_and_time_window_is_inclusive() -> None:
    store, x = filled(400)
    f = SearchFilter(cameras=frozenset({"cam1", "cam2"}), modality="rgb", time_from=10.0,
                     time_to=101.0)
    hits = store.search(x[0], 400, filters=f)[0]
    expect = {m.crop_id for m in metas_for(400) if m.camera in {"cam1", "cam2"}
              and m.modality == "rgb" and 10.0 <= m.capture_time <= 101.0}
    assert {h.meta.crop_id for h in hits} == expect and "crop-101" in expect
    assert store.search(x[0], 5, filters=SearchFilter(cameras=frozenset()))[0] == []
    assert store.search(x[0], 5, filters=SearchFilter(time_from=1e9))[0] == []


def test_search_filter_validation() -> None:
    with pytest.raises(ValueError, match="modality"):
        SearchFilter(modality="thermal")
    with pytest.raises(ValueError, match="empty"):
        SearchFilter(time_from=2.0, time_to=1.0)
    assert SearchFilter(cameras={"a"}).cameras == frozenset({"a"})  # type: ignore[arg-type]


# -- exact vs approximate, migration ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_agrees_with_exact_on_clustered_data(kind: str) -> None:
    store, _ = filled(6000, index_kind=kind)
    assert store.active_kind == kind and store.search_knob > 0
    queries = clustered(40, seed=7)  # unseen samples of the same identities
    approx = store.search(queries, 50)
    exact = store.search(queries, 50, exact=True)
    recall = np.mean([len(set(hit_ids(a)) & set(hit_ids(e))) / 50
                      for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9
    q0 = unit(queries[0])
    for hit in approx[0][:5]:  # scores are exact cosines even from a quantised index
        row = int(hit.meta.crop_id.split("-")[1])
        assert hit.score == pytest.approx(float(unit(clustered(6000)[row]) @ q0), abs=1e-5)


def test_flat_migrates_to_approximate_and_keeps_all_ids() -> None:
    store = PrefilterStore(DIM, exact_max=2500)
    x = clustered(6000)
    metas = metas_for(6000)
    kinds = []
    for start in range(0, 6000, 1000):
        store.add(x[start : start + 1000], metas[start : start + 1000])
        kinds.append(store.active_kind)
    assert kinds == ["flat", "flat", "hnsw", "hnsw", "hnsw", "hnsw"]  # CPU: HNSW above
    assert len(store) == 6000 and all(m.crop_id in store for m in metas)
    assert store.get_meta("crop-4321") == metas[4321]
    found = store.search(x, 1)
    self_hits = np.mean([h[0].meta.crop_id == m.crop_id for h, m in zip(found, metas, strict=True)])
    assert self_hits >= 0.99


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_remove_excludes_and_compaction_keeps_the_rest(kind: str) -> None:
    store, x = filled(4000, index_kind=kind)
    assert store.remove(["crop-0", "crop-1", "missing"]) == 2
    assert "crop-0" not in store and store.get_meta("crop-1") is None and len(store) == 3998
    assert "crop-0" not in {h.meta.crop_id for h in store.search(x[0], 10)[0]}
    assert store.remove([f"crop-{i}" for i in range(2, 1500)]) == 1498  # triggers compaction
    assert len(store) == 2500 and store.active_kind == kind
    hits = store.search(x[2000:2100], 1)
    assert np.mean([h[0].meta.crop_id == f"crop-{2000 + i}" for i, h in enumerate(hits)]) >= 0.99
    assert store.add(x[:1], metas_for(1)) == 1 and "crop-0" in store  # re-add after removal


# -- snapshots -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_snapshot_round_trip_is_identical(kind: str, tmp_path: Path) -> None:
    store, _ = filled(3000, index_kind=kind)
    store.remove(["crop-5", "crop-6"])
    store.offsets.update({"indexed.v1:0": 1234, "indexed.v1:1": 99})
    queries = clustered(10, seed=11)
    f = SearchFilter(modality="rgb", time_from=100.0)
    data = store.to_bytes()
    assert data == store.to_bytes()  # deterministic
    path = tmp_path / "store.snap"
    store.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["store.snap"]  # no temporary left over
    for copy in (PrefilterStore.from_bytes(data), PrefilterStore.load(path)):
        assert copy.offsets == store.offsets and len(copy) == len(store)
        assert copy.active_kind == store.active_kind and copy.search_knob == store.search_knob
        assert copy.search(queries, 20) == store.search(queries, 20)
        assert copy.search(queries, 20, filters=f) == store.search(queries, 20, filters=f)
        assert "crop-5" not in copy and copy.get_meta("crop-7") == store.get_meta("crop-7")
        assert copy.to_bytes() == data


def test_corrupt_snapshots_raise_value_error() -> None:
    store, _ = filled(200)
    data = store.to_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    for bad in (b"", b"garbage" * 10, data[:-1], data[:100], bytes(flipped),
                b"XXXXXXXX" + data[8:]):
        with pytest.raises(ValueError, match="snapshot"):
            PrefilterStore.from_bytes(bad)


def test_future_snapshot_version_is_refused() -> None:
    data = PrefilterStore(DIM).to_bytes()
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    header["version"] = 99
    raw = json.dumps(header).encode()
    body = data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + n : -32]
    with pytest.raises(ValueError, match="version 99"):
        PrefilterStore.from_bytes(body + hashlib.sha256(body).digest())


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_raises_and_leaves_store_unchanged() -> None:
    store, x = filled(100)
    before = store.to_bytes()
    nan = x[:3].copy()
    nan[1, 4] = np.nan
    cases = [
        (x[:3, :-1], metas_for(3, 1000), "shape"),
        (nan, metas_for(3, 1000), "NaN"),
        (x[:3] * np.inf, metas_for(3, 1000), "NaN or Inf"),
        (x[:3], metas_for(2, 1000), "3 vectors but 2 metas"),
        (x[:3].astype(np.int64), metas_for(3, 1000), "floating-point"),
        (np.zeros((3, DIM), np.float32), metas_for(3, 1000), "all-zero"),
        (x[0], metas_for(1, 1000), "shape"),
        (x[:1], [VectorMeta("z", "c", "thermal", 0.0)], "modality"),
        (x[:1], [VectorMeta("z", "c", "rgb", float("nan"))], "capture_time"),
    ]
    for vectors, metas, message in cases:
        with pytest.raises(ValueError, match=message):
            store.add(vectors, metas)
    for query, k, message in ((x[0, :5], 3, "shape"), (x[0], 0, "k must"),
                              (np.full(DIM, np.nan), 3, "NaN")):
        with pytest.raises(ValueError, match=message):
            store.search(query, k)
    assert store.to_bytes() == before and len(store) == 100


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_searches_while_a_writer_adds() -> None:
    x = clustered(8000)
    metas = metas_for(8000)
    store = PrefilterStore(DIM, exact_max=4000)  # the writer crosses into HNSW mid-way
    store.add(x[:3000], metas[:3000])
    errors: list[BaseException] = []
    done = threading.Event()
    f = SearchFilter(cameras=frozenset({"cam1"}))

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not done.is_set():
                q = x[rng.integers(0, 3000, 4)]
                assert all(len(h) == 10 for h in store.search(q, 10))
                assert all(h.meta.camera == "cam1" for h in store.search(q[0], 10, filters=f)[0])
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for start in range(3000, 8000, 500):
            assert store.add(x[start : start + 500], metas[start : start + 500]) == 500
            store.add(x[start : start + 10], metas[start : start + 10])  # replays: no-ops
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(store) == 8000 and store.active_kind == "hnsw"


def test_memory_bytes_counts_vectors_and_index() -> None:
    store, _ = filled(3000, index_kind="ivf")
    assert store.memory_bytes() > 3000 * (DIM * 4 + DIM)


def test_hnsw_keeps_one_copy_of_the_vectors() -> None:
    dim, n = 256, 3000
    store = PrefilterStore(dim, index_kind="hnsw")
    store.add(clustered(n, dim=dim), metas_for(n))
    vector_bytes = n * dim * 4
    assert store.memory_bytes() < 1.9 * vector_bytes  # links + metadata; a copy would be 2x+
    assert len(store.to_bytes()) < 1.6 * vector_bytes


def test_newest_is_the_filtered_gallery_most_recent_first() -> None:
    store, _ = filled(40)  # crop-i: camera cam{i % 4}, capture time grows with i
    times = {m.crop_id: m.capture_time for m in metas_for(40)}
    store.remove(["crop-37"])
    picked = store.newest(3, SearchFilter(cameras=frozenset({"cam1"})), exclude={"crop-33"})
    assert [m.crop_id for m in picked] == ["crop-29", "crop-25", "crop-21"]
    everything = store.newest(100)
    assert len(everything) == 39 and "crop-37" not in {m.crop_id for m in everything}
    ordered = [times[m.crop_id] for m in everything]
    assert ordered == sorted(ordered, reverse=True)
