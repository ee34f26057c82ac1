"""The plain-FAISS peer measurements of the prefilter benchmark (benchmarks/prefilter_peers.py)
on tiny data: exhaustive knobs are exact, knobs reach the index, same-identity recall and the
frontier check count what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import prefilter_peers as peers

N, D, Q, K, IDS = 3000, 32, 40, 10, 150


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((IDS, D)).astype(np.float32)
    gallery_labels = rng.integers(0, IDS, N)
    query_labels = rng.integers(0, IDS, Q)
    xb = centres[gallery_labels] + 0.6 * rng.standard_normal((N, D), dtype=np.float32)
    xq = centres[query_labels] + 0.6 * rng.standard_normal((Q, D), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(D)
    exact.add(xb)
    _, truth = exact.search(xq, K)
    return {"xb": xb, "xq": xq, "truth": truth, "gl": gallery_labels, "ql": query_labels}


@pytest.fixture(scope="module")
def rows(data: dict[str, np.ndarray]) -> list[dict]:
    return peers.measure_peers(
        data["xb"], data["xq"], data["truth"], k=K, query_labels=data["ql"],
        gallery_labels=data["gl"], configs=["IVF16,Flat", "HNSW8,Flat", "IVF16,PQ8x4fs,RFlat"],
        knobs={"IVF16,Flat": [{"nprobe": 16}, {"nprobe": 1}],
               "HNSW8,Flat": [{"efSearch": 64}],
               "IVF16,PQ8x4fs,RFlat": [{"nprobe": 16, "k_factor": 64},
                                       {"nprobe": 1, "k_factor": 64},
                                       {"nprobe": 16, "k_factor": 1}]})


def _row(rows: list[dict], config: str, **knob: int) -> dict:
    return next(r for r in rows if r["config"] == config and r["knob"] == knob)


def test_an_exhaustive_knob_is_exact_and_knobs_reach_the_index(rows: list[dict]) -> None:
    assert len(rows) == 6
    for r in rows:
        assert set(r) == {"config", "knob", "build_s", "bytes_per_vector", "p50_ms", "p95_ms",
                          "recall_at_k", "same_identity_recall"}
        assert r["build_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"]
    exhaustive = _row(rows, "IVF16,Flat", nprobe=16)
    assert exhaustive["recall_at_k"] == 1.0 and exhaustive["same_identity_recall"] == 1.0
    assert exhaustive["bytes_per_vector"] > D * 4  # the vectors, ids and centroids
    assert _row(rows, "IVF16,Flat", nprobe=1)["recall_at_k"] < 0.9
    assert _row(rows, "HNSW8,Flat", efSearch=64)["recall_at_k"] > 0.9
    # the refine wrapper passes nprobe to its base index and reranks k * k_factor candidates
    assert _row(rows, "IVF16,PQ8x4fs,RFlat", nprobe=16, k_factor=64)["recall_at_k"] == 1.0
    assert _row(rows, "IVF16,PQ8x4fs,RFlat", nprobe=1, k_factor=64)["recall_at_k"] < 0.9
    assert _row(rows, "IVF16,PQ8x4fs,RFlat", nprobe=16, k_factor=1)["recall_at_k"] < 1.0
    assert peers.peer_table(rows, "peers").row_count == 6


def test_hnsw_is_skipped_above_max_build_n(data: dict[str, np.ndarray]) -> None:
    out = peers.measure_peers(data["xb"], data["xq"], data["truth"], k=K,
                              configs=["HNSW8,Flat", "Flat"], max_build_n=1000)
    assert out[0] == {"config": "HNSW8,Flat", "skipped": out[0]["skipped"]}
    assert "max_build_n=1,000" in out[0]["skipped"]
    assert out[1]["knob"] == {} and out[1]["recall_at_k"] == 1.0
    assert out[1]["same_identity_recall"] is None  # no labels given
    assert peers.peer_table(out, "peers").row_count == 2


def test_same_identity_recall_by_hand() -> None:
    gallery_labels = np.array([7, 7, 3, 7, 3, 5])
    truth = np.array([[0, 1, 2, 3],    # query label 7: rows 0, 1, 3 show the person
                      [2, 4, 0, 5],    # query label 3: rows 2, 4
                      [0, 1, 2, 4]])   # query label 9: nobody, not averaged
    found = np.array([[0, 2, 5, 4],    # 1 of 3
                      [2, 4, 1, 0],    # 2 of 2
                      [5, 5, 5, 5]])
    got = peers.same_identity_recall(found, truth, np.array([7, 3, 9]), gallery_labels)
    assert got == pytest.approx((1 / 3 + 1) / 2)
    assert peers.same_identity_recall(found[2:], truth[2:], np.array([9]), gallery_labels) is None
    assert peers.recall_at_k(found, truth) == pytest.approx((2 / 4 + 3 / 4 + 0 / 4) / 3)


def test_on_frontier() -> None:
    mine = {"p50_ms": 1.0, "recall_at_k": 0.95}
    faster_better = {"config": "A", "knob": {"nprobe": 8}, "p50_ms": 0.5, "recall_at_k": 0.97}
    faster_worse = {"config": "B", "knob": {"efSearch": 64}, "p50_ms": 0.4, "recall_at_k": 0.90}
    slower_better = {"config": "C", "knob": {}, "p50_ms": 3.0, "recall_at_k": 1.0}
    skipped = {"config": "D", "skipped": "too big"}
    out = peers.on_frontier(mine, [faster_better, faster_worse, slower_better, skipped])
    assert out["on_frontier"] is False
    assert [p["config"] for p in out["dominated_by"]] == ["A"]
    assert out["dominated_by"][0]["knob"] == {"nprobe": 8}
    assert peers.on_frontier(mine, [faster_better], tolerance=0.05)["on_frontier"] is True
    best = peers.on_frontier(mine, [faster_worse, slower_better, skipped])
    assert best == {"dominated_by": [], "on_frontier": True}


def test_serialized_bytes_and_query_labels() -> None:
    index = faiss.IndexFlatL2(8)
    index.add(np.zeros((5, 8), dtype=np.float32))
    assert peers.serialized_bytes(index) == len(faiss.serialize_index(index))

    from prefilter_search import ClusteredEmbeddings

    gen = ClusteredEmbeddings(320, 16, seed=3)
    labels = peers.query_labels(gen, 12)
    # each query is nearer its own identity's centre than the average centre is
    queries = gen.queries(12)
    centres = gen.centres / np.linalg.norm(gen.centres, axis=1, keepdims=True)
    own = np.sum(queries * centres[labels], axis=1)
    assert np.all(own > (queries @ centres.T).mean(axis=1))
    # and exactly: the labels are the first draw of the generator queries() uses
    rng = np.random.default_rng([3, 1])
    assert np.array_equal(labels, rng.integers(0, gen.identities, 12))
    cameras = rng.integers(0, 16, 12)
    assert np.array_equal(gen._crops(rng, labels, cameras), queries)
