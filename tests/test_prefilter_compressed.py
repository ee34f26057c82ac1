"""The compressed prefilter index (SQ8 codes + IVF-PQ fast-scan partitions) and the columnar
per-row metadata it relies on to stay under 1 KB a vector."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from chatreid.prefilter import PrefilterStore, SearchFilter, VectorMeta
from chatreid.prefilter.metas import MetaTable
from tests.test_prefilter_store import DIM, clustered, far_matches_store, hit_ids, metas_for, unit


def compressed(n: int, exact_max: int = 500, **kwargs) -> tuple[PrefilterStore, np.ndarray]:
    x = clustered(n)
    store = PrefilterStore(DIM, index_kind="compressed", exact_max=exact_max, **kwargs)
    for start in range(0, n, 1000):  # chunked, as a follower adds: migration and retraining
        store.add(x[start : start + 1000], metas_for(min(1000, n - start), start))
    return store, x


def recall(a: list, b: list, k: int) -> float:
    return float(np.mean([len(set(hit_ids(u)) & set(hit_ids(v))) / k
                          for u, v in zip(a, b, strict=True)]))


def test_exact_until_exact_max_then_codes_replace_the_floats() -> None:
    store = PrefilterStore(DIM, index_kind="compressed", exact_max=2500)
    x, metas = clustered(6000), metas_for(6000)
    kinds = []
    for start in range(0, 6000, 1000):
        store.add(x[start : start + 1000], metas[start : start + 1000])
        kinds.append(store.active_kind)
    assert kinds == ["flat", "flat", "compressed", "compressed", "compressed", "compressed"]
    info = store.index_info()
    assert info["vector_codec"] == "sq8" and info["partitions"] >= 1 and info["nlist"] >= 16
    float_store = PrefilterStore(DIM, index_kind="flat")
    float_store.add(x, metas)
    # one byte a dimension instead of four: the vectors alone shrink 4x
    assert store.memory_bytes() < float_store.memory_bytes() - 6000 * DIM * 2
    assert len(store) == 6000 and store.get_meta("crop-4321") == metas[4321]


def test_compressed_agrees_with_float_exact_search_and_scores_are_cosines() -> None:
    store, x = compressed(6000)
    truth = PrefilterStore(DIM, index_kind="flat")
    truth.add(x, metas_for(6000))
    queries = clustered(40, seed=7)  # unseen samples of the same identities
    assert recall(store.search(queries, 50), truth.search(queries, 50), 50) >= 0.9
    q0 = unit(queries[0])
    for hit in store.search(queries[0], 10)[0]:  # rescored from 8-bit codes: ~1e-3 off
        row = int(hit.meta.crop_id.split("-")[1])
        assert hit.score == pytest.approx(float(unit(x[row]) @ q0), abs=0.01)
    assert store.similarity(q0, ["crop-3", "missing"])[0] == pytest.approx(
        float(unit(x[3]) @ q0), abs=0.01)
    assert np.isnan(store.similarity(q0, ["crop-3", "missing"])[1])
    vectors = store.vectors(["crop-3", "missing"])  # decoded from the codes, ~1e-2 off
    np.testing.assert_allclose(vectors[0], unit(x[3]), atol=0.02)
    assert np.isnan(vectors[1]).all()


@pytest.mark.parametrize("filters", [
    SearchFilter(cameras=frozenset({"cam9", "nope"})),
    SearchFilter(modality="infrared"),
    SearchFilter(time_from=5000.0, time_to=6000.0),
])
def test_filters_apply_before_top_k(filters: SearchFilter) -> None:
    store, q = far_matches_store("compressed", exact_max=10)
    assert store.active_kind == "compressed"
    for queries in (q, np.stack([q] * 9)):  # single-query and batched code paths
        for hits in store.search(queries, 30, filters=filters):
            assert len(hits) == 30 and all(h.meta.camera == "cam9" for h in hits)
    exact = store.search(q, 30, filters=filters, exact=True)[0]
    assert hit_ids(store.search(q, 30, filters=filters)[0]) == hit_ids(exact)


def test_remove_and_compaction_move_codes_without_drift() -> None:
    store, x = compressed(4000)
    q = unit(x[3000])
    before = {h.meta.crop_id: h.score for h in store.search(q, 20, exact=True)[0]}
    assert store.remove([f"crop-{i}" for i in range(0, 1500)]) == 1500  # compacts
    assert len(store) == 2500 and store.active_kind == "compressed"
    after = {h.meta.crop_id: h.score for h in store.search(q, 20, exact=True)[0]}
    shared = before.keys() & after.keys()
    assert shared and all(before[c] == after[c] for c in shared)  # same codes, same scores
    assert not any(int(c.split("-")[1]) < 1500 for c in after)
    hits = store.search(x[2000:2100], 1)
    assert np.mean([h[0].meta.crop_id == f"crop-{2000 + i}" for i, h in enumerate(hits)]) >= 0.95


def test_compressed_never_goes_back_to_floats() -> None:
    store, _ = compressed(3000)
    store.remove([f"crop-{i}" for i in range(2900)])
    assert len(store) == 100 and store.active_kind == "compressed"
    assert store.index_info()["vector_codec"] == "sq8"


def test_snapshot_round_trip_is_identical() -> None:
    store, _ = compressed(3000)
    store.remove(["crop-5", "crop-6"])
    store.offsets["indexed.v1:0"] = 77
    data = store.to_bytes()
    assert data == store.to_bytes()
    copy = PrefilterStore.from_bytes(data)
    queries = clustered(10, seed=11)
    f = SearchFilter(modality="rgb", time_from=100.0)
    assert copy.index_info() == store.index_info() and copy.offsets == store.offsets
    assert copy.search(queries, 20) == store.search(queries, 20)
    assert copy.search(queries, 20, filters=f) == store.search(queries, 20, filters=f)
    assert "crop-5" not in copy and copy.to_bytes() == data
    assert copy.add(clustered(1, seed=3), [VectorMeta("new", "cam0", "rgb", 1.0)]) == 1


def _as_version_1(data: bytes) -> bytes:
    """A float store's snapshot rewritten as the previous build wrote it (JSON metadata)."""
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    pos, sections = 12 + n, {}
    for name, length in header["sections"]:
        sections[name] = data[pos : pos + length]
        pos += length
    store = PrefilterStore.from_bytes(data)
    rows = [[m.crop_id, m.camera, m.modality, m.capture_time, m.site, m.object_key]
            for m in store._metas.rows(range(header["rows"]))]
    sections["metas"] = json.dumps(rows).encode()
    header = {k: v for k, v in header.items()
              if k not in ("vector_codec", "approx_parts", "partitions")}
    header["version"] = 1
    header["sections"] = [[name, len(blob)] for name, blob in sections.items()]
    raw = json.dumps(header).encode()
    body = data[:8] + struct.pack("<I", len(raw)) + raw + b"".join(sections.values())
    return body + hashlib.sha256(body).digest()


def test_version_1_snapshots_of_earlier_builds_still_load() -> None:
    x = clustered(300)
    store = PrefilterStore(DIM)
    store.add(x, metas_for(300))
    old = PrefilterStore.from_bytes(_as_version_1(store.to_bytes()))
    assert len(old) == 300 and old.get_meta("crop-7") == store.get_meta("crop-7")
    assert old.search(x[:5], 10) == store.search(x[:5], 10)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="compressed"):
        PrefilterStore(7, index_kind="compressed")  # no even PQ split of 7 dims
    with pytest.raises(ValueError, match="index_kind"):
        PrefilterStore(DIM, index_kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="partitions"):
        PrefilterStore(DIM, index_kind="compressed", partitions=0)


# -- the metadata columns ---------------------------------------------------------------------


def odd_metas() -> list[VectorMeta]:
    return [
        VectorMeta("a" * 32, "cam1", "rgb", 1.5, "site-a", f"crops/2026-12-06/{'a' * 32}.jpg"),
        VectorMeta("ünï-cøde", "cam2", "infrared", -3.0, "", "elsewhere/x.png"),  # id not in key
        VectorMeta("b", "cam1", "rgb", 2.0, "site-b", ""),
        VectorMeta("c", "cam3", "infrared", 4.0, "site-a", "c"),  # key is the id itself
    ]


def test_meta_table_gives_back_exactly_what_was_added() -> None:
    table = MetaTable()
    metas = odd_metas()
    table.extend(metas[:2])
    table.extend(metas[2:])
    assert len(table) == 4 and [table[i] for i in range(4)] == metas
    assert table.rows(np.array([3, 0])) == [metas[3], metas[0]]
    assert table.crop_id(1) == "ünï-cøde"
    assert table.cams.view.tolist() == [0, 1, 0, 2] and table.mods.view.tolist() == [0, 1, 0, 1]
    taken = table.take(np.array([2, 1]))
    assert [taken[0], taken[1]] == [metas[2], metas[1]]
    copy = MetaTable.from_bytes(table.to_bytes())
    assert copy.rows(range(4)) == metas


def test_meta_table_is_compact() -> None:
    table = MetaTable()
    table.extend([VectorMeta(f"{i:032x}", f"cam{i % 50}", "rgb", float(i), "site",
                             f"crops/2026-12-06/{i:032x}.jpg") for i in range(10_000)])
    assert table.nbytes / len(table) < 80  # 32-byte id + offsets + codes + time


def test_corrupt_meta_columns_are_refused() -> None:
    table = MetaTable()
    table.extend(odd_metas())
    table.cams.view[0] = 99  # a camera code with no name
    with pytest.raises(ValueError, match="name tables"):
        MetaTable.from_bytes(table.to_bytes())


def test_a_restored_store_takes_the_new_settings_from_its_next_add() -> None:
    x, metas = clustered(4000), metas_for(4000)
    store = PrefilterStore(DIM, exact_max=1000)  # auto: HNSW over floats
    store.add(x[:3000], metas[:3000])
    copy = PrefilterStore.from_bytes(store.to_bytes())
    assert copy.active_kind == "hnsw"
    copy.reconfigure("compressed", 0.95)  # what a follower does after a restore
    copy.add(x[3000:], metas[3000:])
    assert copy.active_kind == "compressed" and len(copy) == 4000
    queries = clustered(20, seed=9)
    truth = PrefilterStore(DIM, index_kind="flat")
    truth.add(x, metas)
    assert recall(copy.search(queries, 20), truth.search(queries, 20), 20) >= 0.9
    copy.reconfigure("auto", 0.97)  # codes cannot feed a float index: it stays compressed
    copy.add(clustered(1, seed=2), [VectorMeta("late", "cam0", "rgb", 1.0)])
    assert copy.active_kind == "compressed" and "late" in copy
    with pytest.raises(ValueError, match="target_recall"):
        copy.reconfigure("compressed", 0.0)
