"""Shortlist + the VLM's dialogue -> the API's ranked answer (``schemas.QueryResponse``).

Two orders (``serve.ranking``; ``chatreid.rerank.ranking``, the same function the
evaluation scores): ``"confidence"`` (the paper's: the reranked crops by the dialogue's
confidence, then the rest in prefilter order) and ``"fused"`` (every shortlisted crop by
``w * confidence + (1 - w) * softmax(prefilter score / T)``, ``w = serve.fused_weight``).
Either way each result reports its own confidence and prefilter score.
"""

from __future__ import annotations

from chatreid.query.shortlist import Shortlist
from chatreid.query.vlm import RerankAnswer
from chatreid.rerank import Ranked
from chatreid.rerank.ranking import RankingMode, fused_order
from schemas import QueryRequest, QueryResponse, ResultItem, Turn


def crop_url(base_url: str, crop_id: str) -> str:
    return f"{base_url}/v1/crops/{crop_id}"


def ordered(shortlist: Shortlist, ranking: list[Ranked], mode: RankingMode = "confidence",
            fused_weight: float = 0.5) -> list[Ranked]:
    """The dialogue's ``ranking`` in ``mode``'s order (ranks renumbered from 1)."""
    if mode == "confidence":
        return list(ranking)
    if mode != "fused":
        raise ValueError(f"unknown ranking mode {mode!r} (confidence, fused)")
    by_id = {r.candidate_id: r for r in ranking}
    listed = [s for s in shortlist.items if s.crop_id in by_id]  # prefilter order
    items = [by_id[s.crop_id] for s in listed]
    order = fused_order([r.confidence for r in items], [s.score for s in listed], fused_weight)
    return [_renumbered(items[i], n + 1) for n, i in enumerate(order)]


def _renumbered(r: Ranked, rank: int) -> Ranked:
    return Ranked(rank, r.candidate_id, r.prefilter_rank, r.prefilter_score, r.reranked,
                  r.confidence, r.turn, r.turn_probability)


def assemble(request: QueryRequest, shortlist: Shortlist, answer: RerankAnswer, *,
             query_id: str, base_url: str, elapsed_ms: float,
             ranking: RankingMode = "confidence", fused_weight: float = 0.5) -> QueryResponse:
    """Results in ``ranking``'s order (module doc), cut to ``request.top``; every result
    carries its confidence, prefilter score, and where to see it and when."""
    items = {r.crop_id: r for r in shortlist.items}
    results = []
    for r in ordered(shortlist, answer.result.ranking, ranking, fused_weight)[: request.top]:
        s = items[r.candidate_id]
        results.append(ResultItem(
            rank=r.rank, crop_id=s.crop_id, camera=s.camera, modality=s.modality,
            capture_time=s.capture_time, url=crop_url(base_url, s.crop_id),
            prefilter_score=s.score, prefilter_rank=r.prefilter_rank,
            confidence=r.confidence, reranked=r.reranked,
            rationale=answer.rationales.get(s.crop_id),
        ))
    turns = [Turn(index=t.index, candidates=t.shown, chosen=t.chosen,
                  confidence=t.probability) for t in answer.result.turns]
    return QueryResponse(
        query_id=query_id, kind=request.kind, results=results, turns=turns,
        candidates=len(shortlist.items), vlm_calls=answer.result.stats.forwards,
        # no reranked result: the model abstains on this kind (``IdentityConfig.abstain``)
        prefilter_only=not any(r.reranked for r in answer.result.ranking),
        model_version=answer.model_version,
        embedder_version=shortlist.embedder_version, elapsed_ms=elapsed_ms,
    )
