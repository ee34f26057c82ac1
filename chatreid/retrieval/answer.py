"""Shortlist + the VLM's dialogue -> the API's ranked answer (``schemas.QueryResponse``)."""

from __future__ import annotations

from chatreid.retrieval.shortlist import Shortlist
from chatreid.retrieval.vlm import RerankAnswer
from chatreid.schemas import QueryRequest, QueryResponse, ResultItem, Turn


def crop_url(base_url: str, crop_id: str) -> str:
    return f"{base_url}/v1/crops/{crop_id}"


def assemble(request: QueryRequest, shortlist: Shortlist, answer: RerankAnswer, *,
             query_id: str, base_url: str, elapsed_ms: float) -> QueryResponse:
    """Results in the dialogue's ranking (reranked by confidence, then the rest in prefilter
    order), cut to ``request.top``; every result carries where to see it and when."""
    items = {r.crop_id: r for r in shortlist.items}
    results = []
    for r in answer.result.ranking[: request.top]:
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
        prefilter_only=False, model_version=answer.model_version,
        embedder_version=shortlist.embedder_version, elapsed_ms=elapsed_ms,
    )
