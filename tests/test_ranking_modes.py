"""Ranking modes: the fused score (confidence blended with the prefilter's share), its weight
fitted on validation queries only, and the evaluation's fused and peer rows on the tiny world."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatreid.evaluation import SYNTHETIC, EvalConfig, RerankOutcome
from chatreid.evaluation.ranking import RankingRun, fit_fused_weight, fused_mAP, split_queries
from chatreid.evaluation.runner import evaluate_task
from chatreid.metrics import Labels
from chatreid.rerank.ranking import PREFILTER_TEMPERATURE, fused_order, prefilter_shares

# --- the fused score ---------------------------------------------------------------------------


def test_weight_zero_is_the_prefilter_order_and_one_the_confidence_order() -> None:
    sims = [0.91, 0.90, 0.84, 0.80, 0.79]  # prefilter order
    conf = [0.05, 0.10, 0.60, None, 0.25]
    assert fused_order(conf, sims, 0.0) == [0, 1, 2, 3, 4]
    assert fused_order(conf, sims, 1.0) == [2, 4, 1, 0, 3]  # None: not reranked, no belief
    assert fused_order(conf, sims, 0.5) not in ([0, 1, 2, 3, 4], [2, 4, 1, 0, 3])


def test_ties_keep_the_prefilter_order() -> None:
    assert fused_order([0.2, 0.2, 0.2], [0.5, 0.5, 0.5], 0.5) == [0, 1, 2]
    assert fused_order([None, None], [None, None], 1.0) == [0, 1]


def test_prefilter_shares_are_a_softmax_over_the_shortlist() -> None:
    shares = prefilter_shares([0.90, 0.85, 0.80])
    assert shares.sum() == pytest.approx(1.0)
    # one temperature step of cosine is a factor e in share
    assert shares[0] / shares[1] == pytest.approx(np.e)
    assert PREFILTER_TEMPERATURE == 0.05
    assert prefilter_shares([None, None]) == pytest.approx([0.5, 0.5])
    assert prefilter_shares([0.9, None])[1] == pytest.approx(0.5)  # missing = the lowest seen


def test_bad_weights_and_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fused_order([0.5], [0.5], 1.5)
    with pytest.raises(ValueError, match="2 confidences for 1"):
        fused_order([0.5, 0.5], [0.5], 0.5)
    with pytest.raises(ValueError, match="ranking must be one of"):
        EvalConfig(ranking="best")
    with pytest.raises(ValueError, match="fused_weight"):
        EvalConfig(ranking="fused", fused_weight=-0.1)


# --- fitting w on validation queries only ------------------------------------------------------

# Each query's shortlist holds its own person and one other, at prefilter similarities 0.90 and
# 0.88 (shares 0.60 / 0.40 at T = 0.05). (first right?, confidences of first and second):
KINDS = {
    "A": (False, [0.2, 0.8]),  # the dialogue is right, the prefilter wrong: needs w > 0.25
    "B": (True, [0.45, 0.55]),  # prefilter right, the dialogue mildly wrong: needs w < 0.66
    "C": (True, [0.1, 0.9]),  # prefilter right, the dialogue badly wrong: needs w < 0.2
}


def constructed_run(kinds: str) -> RankingRun:
    n = len(kinds)
    dist = np.full((n, 2 * n), 0.9)
    lists, confs, g_pids = [], [], []
    for i, kind in enumerate(kinds):
        first_right, conf = KINDS[kind]
        dist[i, 2 * i], dist[i, 2 * i + 1] = 0.10, 0.12
        lists.append([2 * i, 2 * i + 1])
        confs.append(conf)
        g_pids += [i, 1000 + i] if first_right else [1000 + i, i]
    query = Labels(np.arange(n), np.zeros(n, dtype=int))
    gallery = Labels(np.array(g_pids), np.ones(2 * n, dtype=int))
    return RankingRun(dist, lists, confs, query, gallery, "standard")


def test_the_weight_is_the_validation_queries_best_not_the_test_queries() -> None:
    run = constructed_run("ABAB" + "CCCC")
    validation, test = [0, 1, 2, 3], [4, 5, 6, 7]
    fit = fit_fused_weight([run], [validation])
    assert fit.weight == 0.65  # both validation kinds right: 0.25 < w < 0.66 (ties: largest)
    assert fit.validation_mAP == pytest.approx(1.0)
    assert fit.curve[1.0] < 1.0 and fit.curve[0.0] < 1.0
    test_best = max((fused_mAP([run], [test], w), w) for w in fit.curve)[1]
    assert test_best <= 0.15  # on the test queries a small w would have won
    assert fused_mAP([run], [test], fit.weight) < fused_mAP([run], [test], test_best)


def test_the_fit_never_reads_the_test_queries() -> None:
    run = constructed_run("ABAB" + "CCCC")
    flipped = dataclasses.replace(  # test queries that would pull w to 1
        run, confidences=[*run.confidences[:4], *([[0.9, 0.1]] * 4)])
    garbage = dataclasses.replace(run, confidences=[*run.confidences[:4], *([[None, None]] * 4)])
    fits = [fit_fused_weight([r], [[0, 1, 2, 3]]) for r in (run, flipped, garbage)]
    assert {f.weight for f in fits} == {0.65}
    assert fits[0].curve == fits[1].curve == fits[2].curve


def test_ties_and_empty_validation() -> None:
    run = constructed_run("AA")
    assert fit_fused_weight([run], [[0, 1]]).weight == 1.0  # all w > 0.25 tie: the largest
    empty = fit_fused_weight([run], [[]])
    assert empty.weight == 1.0 and np.isnan(empty.validation_mAP)


def test_the_query_split_is_deterministic_and_disjoint() -> None:
    val, test = split_queries(11, seed=3)
    assert (val, test) == split_queries(11, seed=3)
    assert len(val) == 5 and len(test) == 6 and sorted(val + test) == list(range(11))
    assert split_queries(11, seed=4) != (val, test)


# --- the evaluation's rows on the tiny world ---------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    from chatreid.embedder import build_embedder

    return build_embedder(None, height=128, width=64, batch_size=32)


def reversed_with_confidences(jobs):
    """The dialogue reverses the prefilter's order, sure of its first pick."""
    out = []
    for j in jobs:
        n = len(j.candidates)
        order = tuple(reversed(range(n)))
        shares = [0.9 * 0.1**t for t in range(n)]
        conf = [0.0] * n
        for t, c in enumerate(order):
            conf[c] = shares[t]
        out.append(RerankOutcome(j.key, order, 1, tuple(conf)))
    return out


def test_fused_rows_span_the_prefilter_and_the_confidence_order(world, embedder) -> None:
    task = SYNTHETIC["synth_standard"]
    base = EvalConfig(k=5, max_queries=6)
    conf = evaluate_task(task, world, embedder.embed, reversed_with_confidences, base)
    assert conf.fused is None and conf.fused_weight is None
    at = {w: evaluate_task(task, world, embedder.embed, reversed_with_confidences,
                           dataclasses.replace(base, ranking="fused", fused_weight=w))
          for w in (0.0, 1.0)}
    assert at[0.0].fused.mAP == pytest.approx(conf.baseline.mAP)  # w = 0: the prefilter
    assert at[1.0].fused.mAP == pytest.approx(conf.chatreid.mAP)  # w = 1: the confidence order
    assert at[1.0].fused_weight == 1.0 and at[1.0].queries == 6  # a given w: every query
    # The peer row: k-reciprocal over the same features, the same queries.
    assert conf.peer is not None and conf.peer.queries == conf.baseline.queries
    assert 0.0 <= conf.peer.mAP <= 1.0


def test_a_fitted_weight_reports_every_row_on_the_test_half(world, embedder) -> None:
    task = SYNTHETIC["synth_standard"]
    cfg = EvalConfig(k=5, ranking="fused")
    seen = []

    def record(jobs):
        seen.extend(jobs)
        return reversed_with_confidences(jobs)

    r = evaluate_task(task, world, embedder.embed, record, cfg)
    n = len(seen)  # every query reranked: the validation half to fit w, the test half to score
    assert n >= 4 and r.queries == n - n // 2 and r.vlm_calls == r.queries  # test half only
    assert r.baseline.queries + r.baseline.skipped == r.queries
    assert r.chatreid.queries == r.fused.queries == r.peer.queries == r.baseline.queries
    assert r.fused_weight in [round(w, 2) for w in np.linspace(0, 1, 21)]
    assert any("fitted on a validation half" in n for n in r.notes)


def test_text_queries_have_no_peer_row(world, embedder) -> None:
    r = evaluate_task(SYNTHETIC["synth_text_to_image"], world, embedder.embed,
                      reversed_with_confidences, EvalConfig(k=3, max_queries=3))
    assert r.peer is None and r.chatreid is not None


def test_the_report_shows_the_peer_and_fused_rows(world, embedder, tmp_path) -> None:
    import json

    from chatreid.evaluation.report import write_report

    cfg = EvalConfig(k=5, max_queries=6, ranking="fused", fused_weight=0.4)
    r = evaluate_task(SYNTHETIC["synth_standard"], world, embedder.embed,
                      reversed_with_confidences, cfg)
    report = write_report({"tiny": [r]}, cfg, tmp_path, {"suite": "synthetic"}).read_text()
    assert "| k-reciprocal (peer) |" in report
    assert "| ChatReID (tiny, confidence) |" in report
    assert "| ChatReID (tiny, fused, w=0.4) |" in report
    data = json.loads((tmp_path / "results.json").read_text())["models"]["tiny"][0]
    assert data["fused_weight"] == 0.4 and data["fused"]["mAP"] == pytest.approx(r.fused.mAP)
    assert data["peer"]["mAP"] == pytest.approx(r.peer.mAP)


# --- serving: the same order in the API's answer -----------------------------------------------


def test_serving_orders_results_by_the_fused_score() -> None:
    from datetime import UTC, datetime

    from chatreid.prefilter.search import SearchResult
    from chatreid.query.answer import ordered
    from chatreid.query.shortlist import Shortlist
    from chatreid.rerank import Ranked
    from chatreid.rerank.prompts import QueryKind

    scores = [0.91, 0.90, 0.84]
    items = [SearchResult(i + 1, f"c{i}", s, "cam", "rgb", datetime.now(UTC), f"k{i}")
             for i, s in enumerate(scores)]
    shortlist = Shortlist(QueryKind.STANDARD, "q", None, "rgb", items, 3, "emb")
    conf = {"c2": 0.7, "c1": 0.2, "c0": 0.1}  # the dialogue's ranking: c2, c1, c0
    ranking = [Ranked(n + 1, cid, int(cid[1]) + 1, scores[int(cid[1])], True, c, n, c)
               for n, (cid, c) in enumerate(conf.items())]
    assert ordered(shortlist, ranking) == ranking  # the paper's mode: as the dialogue ranked
    assert [r.candidate_id for r in ordered(shortlist, ranking, "fused", 1.0)] == \
        ["c2", "c1", "c0"]
    prefilter = ordered(shortlist, ranking, "fused", 0.0)
    assert [r.candidate_id for r in prefilter] == ["c0", "c1", "c2"]
    assert [r.rank for r in prefilter] == [1, 2, 3]
    assert [r.confidence for r in prefilter] == [0.1, 0.2, 0.7]  # each keeps its confidence
    with pytest.raises(ValueError, match="unknown ranking mode"):
        ordered(shortlist, ranking, "best")
