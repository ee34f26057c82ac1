"""VLM rerank: the paper's multi-turn best-choice dialogue over prefiltered candidates.

- ``prompts``: query kinds and their stage-3 prompts (query part + candidate list);
- ``judge``: one best-choice forward per group, plain or with the query prefix reused;
- ``reranker``: ``BestChoiceReranker.rerank(query, candidates)`` → ranking, turns, stats.
"""

from chatreid.rerank.judge import PlainJudge, PrefixJudge, Query
from chatreid.rerank.prompts import (
    BestChoicePrompt,
    QueryKind,
    attribute_text,
    best_choice_prompt,
)
from chatreid.rerank.reranker import (
    DEFAULT_GROUP_SIZE,
    BestChoiceReranker,
    Candidate,
    EmptyGalleryError,
    Ranked,
    RerankResult,
    RerankStats,
    TurnRecord,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "BestChoicePrompt",
    "BestChoiceReranker",
    "Candidate",
    "EmptyGalleryError",
    "PlainJudge",
    "PrefixJudge",
    "Query",
    "QueryKind",
    "Ranked",
    "RerankResult",
    "RerankStats",
    "TurnRecord",
    "attribute_text",
    "best_choice_prompt",
]
