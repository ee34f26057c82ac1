"""Fitting and scoring the fused ranking on evaluation queries: the weight ``w`` of
``chatreid.rerank.ranking.fused_order`` (the order serving uses) is fitted by
``fit_fused_weight`` on validation queries only (a grid over [0, 1], maximising mAP);
``split_queries`` is the evaluation's deterministic validation / test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chatreid.metrics import Labels, mean_metrics, rank_metrics
from chatreid.rerank.ranking import fused_order

WEIGHT_GRID: tuple[float, ...] = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 21))

__all__ = ["WEIGHT_GRID", "FusedFit", "RankingRun", "fit_fused_weight", "fused_mAP",
           "ordered_distances", "select_rows", "split_queries"]


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
