"""Evaluation protocols: each junk rule on hand-worked cases, and the vectorised routine against
an independent per-query reference (torchreid's formulation) on random matrices."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from chatreid.metrics import (
    PROTOCOLS,
    Labels,
    Protocol,
    mean_metrics,
    rank_metrics,
    sample_gallery,
)
from chatreid.metrics.protocols import _hit_ranks


def reference(distmat, q: Labels, g: Labels, protocol: Protocol, max_rank: int = 50):
    """One query at a time, written from the protocol definitions, not from the fast code."""
    cmcs, aps, inps = [], [], []
    for i in range(len(q)):
        order = np.argsort(distmat[i], kind="stable")
        same_pid = g.pids[order] == q.pids[i]
        remove = np.zeros(len(order), dtype=bool)
        if protocol.same_camera_junk:
            remove |= same_pid & (g.camids[order] == q.camids[i])
        for pid in protocol.junk_pids:
            remove |= g.pids[order] == pid
        if protocol.clothes == "changed":
            remove |= same_pid & (g.clothes[order] == q.clothes[i])
        if protocol.clothes == "same":
            remove |= same_pid & (g.clothes[order] != q.clothes[i])
        for cam in protocol.camera_junk.get(int(q.camids[i]), ()):
            remove |= g.camids[order] == cam
        raw = same_pid[~remove].astype(float)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        cmc = np.pad(cmc, (0, max(0, max_rank - len(cmc))), constant_values=1)[:max_rank]
        cmcs.append(cmc)
        precision = raw.cumsum() / np.arange(1, len(raw) + 1)
        aps.append((precision * raw).sum() / raw.sum())
        last = np.nonzero(raw)[0].max()
        inps.append(raw.cumsum()[last] / (last + 1))
    return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps), len(q) - len(aps)


def random_case(rng, nq=37, ng=211, pids=25, cams=6, ties=True):
    q = Labels(rng.integers(1, pids, nq), rng.integers(1, cams + 1, nq), rng.integers(0, 3, nq))
    g_pids = rng.integers(-1, pids, ng)  # includes Market's junk (-1) and distractors (0)
    g = Labels(g_pids, rng.integers(1, cams + 1, ng), rng.integers(0, 3, ng))
    distmat = rng.random((nq, ng)).astype(np.float32)
    if ties:
        distmat[:, rng.choice(ng, 20)] = 0.5  # ties: stable order must be kept
    return distmat, q, g


def seeded(name: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()) + salt)  # hash() varies per run


def assert_matches_reference(distmat, q: Labels, g: Labels, protocol: Protocol) -> None:
    cmc, m_ap, m_inp, skipped = reference(distmat, q, g, protocol, max_rank=20)
    got = rank_metrics(distmat, q, g, protocol, max_rank=20, chunk=8)  # several chunks
    assert got.cmc == pytest.approx(cmc, abs=1e-9)
    assert got.mAP == pytest.approx(m_ap, abs=1e-9)
    assert got.mINP == pytest.approx(m_inp, abs=1e-9)
    assert got.skipped == skipped and got.queries == len(q) - skipped
    same = rank_metrics(-distmat, q, g, protocol, similarity=True, max_rank=20)
    assert same.mAP == pytest.approx(got.mAP) and same.cmc == pytest.approx(got.cmc)
    assert same.mINP == pytest.approx(got.mINP)


COUNTED = [n for n, p in PROTOCOLS.items() if not p.single_gallery_shot]


@pytest.mark.parametrize("name", COUNTED)
def test_matches_the_reference_on_random_matrices(name) -> None:
    rng = seeded(name)
    for ties in (True, True, True, False):
        assert_matches_reference(*random_case(rng, ties=ties), PROTOCOLS[name])


@pytest.mark.parametrize("name", COUNTED)
def test_hits_tied_with_non_hits_keep_gallery_order(name) -> None:
    rng = seeded(name, 1)
    for _ in range(3):
        distmat, q, g = random_case(rng, ties=False)
        assert_matches_reference(np.round(distmat * 4) / 4, q, g, PROTOCOLS[name])  # 5 values
        # even rows: a hit's distance copied onto other identities on both sides of it;
        # odd rows: the query identity's entries tied with each other only
        for i in range(len(q)):
            same, others = np.nonzero(g.pids == q.pids[i])[0], np.nonzero(g.pids != q.pids[i])[0]
            if len(same) and i % 2:
                distmat[i, same] = distmat[i, same[0]]
            elif len(same):
                distmat[i, rng.choice(others, 6)] = distmat[i, rng.choice(same)]
        assert_matches_reference(distmat, q, g, PROTOCOLS[name])


@pytest.mark.parametrize("name", COUNTED)
def test_non_finite_distances_rank_as_the_sort_does(name) -> None:
    rng = seeded(name, 2)
    for _ in range(3):
        distmat, q, g = random_case(rng, ties=False)
        other = q.pids[:, None] != g.pids[None, :]
        for value in (np.inf, -np.inf, np.nan):  # on other identities only: still counted
            distmat[other & (rng.random(distmat.shape) < 0.05)] = value
        assert_matches_reference(distmat, q, g, PROTOCOLS[name])
        distmat[rng.random(distmat.shape) < 0.02] = np.nan  # on some hits too: sorted
        assert_matches_reference(distmat, q, g, PROTOCOLS[name])


def test_counted_ranks_leave_only_hit_non_hit_ties_to_the_sort() -> None:
    # gallery identities 1 1 2 3 1, one camera; queries: identity 1 from another camera
    g = Labels(np.array([1, 1, 2, 3, 1]), np.ones(5, dtype=int))
    q = Labels(np.ones(3, dtype=int), np.full(3, 9))
    dist = np.array([[0.3, 0.1, 0.2, 0.9, 0.5],   # no ties: hits at ranks 1, 3, 4
                     [0.2, 0.2, 0.1, 0.9, 0.2],   # hits tied with each other: ranks 2, 3, 4
                     [0.3, 0.1, 0.3, 0.9, 0.5]],  # identity 2 ties a hit: left to the sort
                    dtype=np.float32)
    ranks, n_hits, redo = _hit_ranks(torch.from_numpy(dist), q, g, PROTOCOLS["standard"])
    assert redo.tolist() == [False, False, True] and n_hits.tolist() == [3, 3, 3]
    assert ranks[0].tolist() == [1, 3, 4] and ranks[1].tolist() == [2, 3, 4]
    # gallery order breaks the tie: the hit at index 0 ranks before identity 2 at index 2
    tied = rank_metrics(dist[2:], Labels(q.pids[2:], q.camids[2:]), g)
    assert tied.mAP == pytest.approx((1 / 1 + 2 / 2 + 3 / 4) / 3)


def _one(gallery: list[tuple[int, int, int]], query=(1, 1, 0)):
    """A query and a gallery given in ranked order (distance = position)."""
    g = Labels(*map(np.array, zip(*gallery, strict=True)))
    q = Labels(np.array([query[0]]), np.array([query[1]]), np.array([query[2]]))
    return np.arange(len(gallery), dtype=np.float32)[None, :], q, g


def test_market_junk_and_distractors() -> None:
    # ranked: junk -1, distractor 0, hit, other person, hit (other camera)
    d, q, g = _one([(-1, 2, 0), (0, 2, 0), (1, 2, 0), (7, 3, 0), (1, 4, 0)])
    m = rank_metrics(d, q, g, "market1501", max_rank=4)
    assert m.cmc.tolist() == [0.0, 1.0, 1.0, 1.0]  # the junk is gone, the distractor costs 1
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mINP == pytest.approx(2 / 4)  # all matches found by rank 4
    standard = rank_metrics(d, q, g, "standard", max_rank=4)
    assert standard.cmc.tolist() == [0.0, 0.0, 1.0, 1.0]  # -1 is an ordinary miss there


def test_same_camera_matches_are_junk_and_queries_without_a_match_are_skipped() -> None:
    d, q, g = _one([(1, 1, 0), (5, 2, 0), (1, 3, 0)])  # first: same person, same camera
    m = rank_metrics(d, q, g, "standard")
    assert m.rank(1) == 0.0 and m.rank(2) == 1.0 and m.mAP == pytest.approx(1 / 2)
    d, q, g = _one([(1, 1, 0), (5, 2, 0)])  # the only match is in the query's camera
    with pytest.raises(ValueError, match="no query has a valid match"):
        rank_metrics(d, q, g, "standard")
    assert rank_metrics(d, q, g, "regdb").rank(1) == 1.0  # RegDB keeps it


def test_ltcc_clothes_settings() -> None:
    # query in clothes 0: same person same clothes (cam 2), other clothes (cam 3)
    d, q, g = _one([(1, 2, 0), (9, 2, 1), (1, 3, 1)])
    assert rank_metrics(d, q, g, "ltcc_general").rank(1) == 1.0
    cc = rank_metrics(d, q, g, "ltcc_cc")
    assert cc.rank(1) == 0.0 and cc.rank(2) == 1.0 and cc.mAP == pytest.approx(1 / 2)
    same = rank_metrics(d, q, g, "ltcc_same")
    assert same.rank(1) == 1.0 and same.mAP == 1.0
    with pytest.raises(ValueError, match="needs clothes ids"):
        rank_metrics(d, Labels(q.pids, q.camids), Labels(g.pids, g.camids), "ltcc_cc")


def test_sysu_camera_rule() -> None:
    # an infrared camera-3 query: everything from RGB camera 2 is removed, whoever it shows
    d, q, g = _one([(1, 2, 0), (4, 2, 0), (6, 1, 0), (1, 5, 0)], query=(1, 3, 0))
    m = rank_metrics(d, q, g, "sysu_mm01")
    assert m.cmc[:2].tolist() == [0.0, 1.0] and m.mAP == pytest.approx(1 / 2)
    d, q, g = _one([(1, 2, 0), (4, 2, 0), (6, 1, 0), (1, 5, 0)], query=(1, 6, 0))
    assert rank_metrics(d, q, g, "sysu_mm01").rank(1) == 1.0  # camera 6 queries keep it


def test_cuhk03_single_gallery_shot() -> None:
    # two crops of person 2 ahead of person 1: one per identity puts person 1 at rank 2
    d, q, g = _one([(2, 2, 0), (2, 2, 0), (1, 2, 0), (3, 2, 0)])
    assert rank_metrics(d, q, g, "cuhk03").cmc[:3].tolist() == [0.0, 0.0, 1.0]
    classic = rank_metrics(d, q, g, "cuhk03_classic")
    assert classic.cmc[:2].tolist() == [0.0, 1.0]
    assert classic.mAP == pytest.approx(1 / 3)  # AP from the whole ranking


def test_text_protocol_has_no_camera_junk() -> None:
    d, q, g = _one([(1, 0, 0), (2, 0, 0)], query=(1, 0, 0))
    assert rank_metrics(d, q, g, "text").rank(1) == 1.0


def test_gallery_draws_and_trial_means() -> None:
    g = Labels(np.repeat(np.arange(4), 6), np.tile([1, 1, 2, 2, 4, 5], 4))
    a, b = sample_gallery(g, seed=0), sample_gallery(g, seed=1)
    assert len(a) == 4 * 4  # one per (identity, camera)
    keys = {(int(g.pids[i]), int(g.camids[i])) for i in a}
    assert len(keys) == len(a)
    assert not np.array_equal(a, b) and np.array_equal(a, sample_gallery(g, seed=0))
    assert len(sample_gallery(g, shots=10)) == 24  # capped at what exists
    d, q, gl = _one([(1, 2, 0), (2, 2, 0)])
    hit_first = rank_metrics(d, q, gl, "standard")
    hit_second = rank_metrics(d[:, ::-1].copy(), q, gl, "standard")
    mean = mean_metrics([hit_first, hit_second])
    assert mean.rank(1) == 0.5 and mean.mAP == pytest.approx((1 + 0.5) / 2)


def test_chatreid_eval_scores_a_saved_matrix(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from chatreid.app.cli import app

    d, q, g = _one([(-1, 2, 0), (0, 2, 0), (1, 2, 0), (7, 3, 0), (1, 4, 0)])
    path = tmp_path / "run.npz"
    np.savez(path, distmat=d, q_pids=q.pids, g_pids=g.pids, q_camids=q.camids,
             g_camids=g.camids)
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["eval", "--distmat", str(path), "--protocol",
                                      "market1501", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["rank1"] == 0.0 and scores["mAP"] == pytest.approx(0.5)
    np.savez(path, similarity=-d, q_pids=q.pids, g_pids=g.pids, q_camids=q.camids,
             g_camids=g.camids)
    again = CliRunner().invoke(app, ["eval", "--distmat", str(path), "--protocol",
                                     "market1501", "--out", str(out)])
    assert again.exit_code == 0 and json.loads(out.read_text())["mAP"] == pytest.approx(0.5)
    np.savez(path, distmat=d, q_pids=q.pids)
    bad = CliRunner().invoke(app, ["eval", "--distmat", str(path)])
    assert bad.exit_code != 0 and "lacks" in bad.output
    unknown = CliRunner().invoke(app, ["eval", "--distmat", str(path), "--protocol", "x"])
    assert unknown.exit_code != 0 and "unknown protocol" in unknown.output
