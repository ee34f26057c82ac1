"""How a reranked shortlist is ordered: the paper's mode and a fused one, shared by serving
(``chatreid.query.answer``) and the evaluation (one scoring function, ``fused_order``).

Modes (``RankingMode``):

- ``"confidence"`` (default, the paper's): the reranked candidates by the dialogue's confidence
  ``c_i`` (the stick-breaking share of the model's belief, ``chatreid.rerank.reranker``), ties
  by turn; the candidates the dialogue did not reach follow in prefilter order.
- ``"fused"``: every shortlisted candidate by

      score_i = w * c_i + (1 - w) * s_i,   s_i = softmax(sim / T)_i over the shortlist,

  ``sim`` the prefilter's similarity (cosine for image queries, the colour-match share for text
  ones, their mean for multimodal ones), ``c_i = 0`` for a candidate the dialogue did not reach.
  Both terms are shares of one unit over the same shortlist, so ``w`` weighs like against like.
  ``T = PREFILTER_TEMPERATURE = 0.05``: a shortlist's top cosines lie within about 0.05-0.2 of
  each other, so a 0.05 step in cosine is a factor ``e`` in share - the prefilter's share then
  spreads over its few best candidates the way a dialogue's belief does, where ``T = 1`` would
  make it flat (every share ~1/K, ``w`` meaningless) and ``T = 0.005`` one-hot. Exact ties in
  ``score`` keep shortlist (prefilter) order. ``w = 0`` is the prefilter's order; ``w = 1``
  the confidence order (up to exactly equal confidences, which go to the better prefilter rank).

``w`` is fitted by the evaluation on validation queries only
(``chatreid.evaluation.ranking.fit_fused_weight``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

RankingMode = Literal["confidence", "fused"]
RANKING_MODES: tuple[str, ...] = ("confidence", "fused")
PREFILTER_TEMPERATURE = 0.05  # softmax temperature over the shortlist's similarities (see above)

__all__ = ["PREFILTER_TEMPERATURE", "RANKING_MODES", "RankingMode", "fused_order", "fused_scores",
           "prefilter_shares"]


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
