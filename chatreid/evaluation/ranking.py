"""How a reranked shortlist is ordered: the paper's mode and a fused one, shared by the
evaluation and serving (one scoring function, ``fused_order``).

Modes (``RankingMode``):

- ``"confidence"`` (default, the paper's): the reranked candidates by the dialogue's confidence
  ``c_i`` (the stick-breaking share of the model's belief, ``chatreid.rerank.reranker``), ties
  by turn; the candidates the dialogue did not reach follow in prefilter order.
- ``"fused"``: every shortlisted candidate by

      score_i = w * c_i + (1 - w) * s_i,   s_i = softmax(sim / T)_i over the shortlist,

  ``sim`` the prefilter's similarity (cosine for image queries, the colour-match share for text
  ones, their mean for adaptive ones), ``c_i = 0`` for a candidate the dialogue did not reach.
  Both terms are shares of one unit over the same shortlist, so ``w`` weighs like against like.
  ``T = PREFILTER_TEMPERATURE = 0.05``: a shortlist's top cosines lie within about 0.05-0.2 of
  each other, so a 0.05 step in cosine is a factor ``e`` in share - the prefilter's share then
  spreads over its few best candidates the way a dialogue's belief does, where ``T = 1`` would
  make it flat (every share ~1/K, ``w`` meaningless) and ``T = 0.005`` one-hot. Exact ties in
  ``score`` keep shortlist (prefilter) order. ``w = 0`` is the prefilter's order; ``w = 1``
  the confidence order (up to exactly equal confidences, which go to the better prefilter rank).

``w`` is fitted by ``fit_fused_weight`` on validation queries only (a grid over [0, 1],
maximising mAP); ``split_queries`` is the evaluation's deterministic validation / test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from chatreid.metrics import Labels, mean_metrics, rank_metrics

RankingMode = Literal["confidence", "fused"]
RANKING_MODES: tuple[str, ...] = ("confidence", "fused")
PREFILTER_TEMPERATURE = 0.05  # softmax temperature over the shortlist's similarities (see above)
WEIGHT_GRID: tuple[float, ...] = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 21))

__all__ = ["PREFILTER_TEMPERATURE", "RANKING_MODES", "WEIGHT_GRID", "FusedFit", "RankingMode",
           "RankingRun", "fit_fused_weight", "fused_order", "fused_scores", "ordered_distances",
           "prefilter_shares", "split_queries"]


def prefilter_shares(similarities: Sequence[float | None],
                     temperature: float = PREFILTER_TEMPERATURE) -> np.ndarray:
    """``softmax(sim / T)`` over the shortlist. A missing similarity (``None``: a text clue
    that named no colour) counts as the lowest present one; all missing: equal shares."""
    present = [s for s in similarities if s is not None]
    if not present:
        return np.full(len(similarities), 1.0 / max(len(similarities), 1))
    floor = min(present)
    sims = np.array([floor if s is None else s for s in similarities], dtype=np.float64)
    logits = sims / temperature
    e = np.exp(logits - logits.max())
    return e / e.sum()


def fused_scores(confidences: Sequence[float | None], prefilter_similarities: Sequence[
        float | None], w: float) -> np.ndarray:
    """``w * c + (1 - w) * softmax(sim / T)`` per shortlisted candidate (``c = 0`` when None)."""
    if len(confidences) != len(prefilter_similarities):
        raise ValueError(f"{len(confidences)} confidences for {len(prefilter_similarities)} "
                         "shortlisted candidates")
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"the fused weight must be in [0, 1], got {w!r}")
    conf = np.array([0.0 if c is None else c for c in confidences], dtype=np.float64)
    return w * conf + (1.0 - w) * prefilter_shares(prefilter_similarities)


def fused_order(confidences: Sequence[float | None],
                prefilter_similarities: Sequence[float | None], w: float) -> list[int]:
    """Shortlist positions (the inputs' order is the prefilter's), best first by the fused
    score; exact ties keep prefilter order."""
    scores = fused_scores(confidences, prefilter_similarities, w)
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def ordered_distances(dist: np.ndarray, shortlists: Sequence[Sequence[int]],
                      orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Distances that rank each row as ``orders`` says: row ``i``'s ``orders[i]`` (positions in
    ``shortlists[i]``) first, in that order, then every other gallery item in the prefilter's
    order (``dist``)."""
    out = dist.astype(np.float64) + 10.0
    for i, (cands, order) in enumerate(zip(shortlists, orders, strict=True)):
        for position, c in enumerate(order):
            out[i, cands[c]] = position * 1e-3
    return out


@dataclass(frozen=True)
class RankingRun:
    """One gallery draw's material: each query's shortlist, the dialogue's confidences over it
    (one per shortlisted candidate, None where not reranked) and the labels to score with."""

    dist: np.ndarray  # prefilter distances (queries, gallery); similarity = 1 - distance
    shortlists: Sequence[Sequence[int]]  # gallery indices, prefilter order
    confidences: Sequence[Sequence[float | None]]
    query: Labels
    gallery: Labels
    protocol: str

    def fused_orders(self, w: float, rows: Sequence[int]) -> list[list[int]]:
        return [fused_order(self.confidences[i],
                            [1.0 - float(self.dist[i, j]) for j in self.shortlists[i]], w)
                for i in rows]


@dataclass(frozen=True)
class FusedFit:
    weight: float
    validation_mAP: float
    curve: dict[float, float]  # w -> validation mAP


def select_rows(labels: Labels, rows: Sequence[int]) -> Labels:
    idx = np.asarray(rows, dtype=np.int64)
    return Labels(labels.pids[idx], labels.camids[idx],
                  None if labels.clothes is None else labels.clothes[idx])


def fused_mAP(runs: Sequence[RankingRun], rows: Sequence[Sequence[int]], w: float) -> float:
    """Mean over ``runs`` of the fused ranking's mAP on each run's ``rows`` (queries)."""
    metrics = []
    for run, r in zip(runs, rows, strict=True):
        if not len(r):
            continue
        dist = ordered_distances(run.dist[r], [run.shortlists[i] for i in r],
                                 run.fused_orders(w, r))
        metrics.append(rank_metrics(dist, select_rows(run.query, r), run.gallery, run.protocol))
    return float(mean_metrics(metrics).mAP) if metrics else float("nan")


def fit_fused_weight(runs: Sequence[RankingRun], validation: Sequence[Sequence[int]],
                     grid: Sequence[float] = WEIGHT_GRID) -> FusedFit:
    """The ``w`` in ``grid`` whose fused ranking has the best mean mAP over the ``validation``
    queries of each run (``validation[k]``: row indices of ``runs[k]``); no other row is read.
    Ties go to the largest ``w`` (closest to the paper's confidence mode); a validation set
    with no scorable query (mAP NaN at every ``w``) gives ``w = 1``."""
    if len(runs) != len(validation):
        raise ValueError(f"{len(validation)} validation row sets for {len(runs)} runs")
    if not grid or any(not 0.0 <= w <= 1.0 for w in grid):
        raise ValueError(f"the weight grid must be non-empty and within [0, 1], got {grid!r}")
    curve = {float(w): fused_mAP(runs, validation, float(w)) for w in grid}
    scored = {w: m for w, m in curve.items() if not np.isnan(m)}
    if not scored:
        return FusedFit(1.0, float("nan"), curve)
    best = max(scored, key=lambda w: (scored[w], w))
    return FusedFit(best, scored[best], curve)


def split_queries(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic half split of ``n`` queries: (validation, test) row indices, each sorted;
    validation gets ``n // 2`` (a seeded permutation, so it does not follow file order)."""
    perm = np.random.default_rng([seed, 16]).permutation(n)
    return sorted(perm[: n // 2].tolist()), sorted(perm[n // 2:].tolist())
