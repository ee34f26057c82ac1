"""Retrieval: what the serving replicas do, free of Ray Serve so it can be tested and reused.

- ``crops``: a crop image read for a query, a vanished or unreachable one as a client's
  error (the error types: :mod:`chatreid.errors`);
- ``shortlist``: the prefilter step - a query request (its upload validated already) in, the
  gallery's top K (filters, τ) out;
- ``vlm``: the rerank side - a verified VLM checkpoint loaded, smoke-checked, asked to rerank
  a shortlist with the best-choice dialogue and, on request, to explain its top results;
- ``answer``: shortlist + rerank result -> the API's ``QueryResponse``.
"""

from chatreid.query.answer import assemble
from chatreid.query.crops import read_crop
from chatreid.query.shortlist import Shortlist, build_shortlist, search_filter
from chatreid.query.vlm import ModelSpec, RerankAnswer, SmokeCheckFailed, VLMRuntime

__all__ = [
    "ModelSpec",
    "RerankAnswer",
    "Shortlist",
    "SmokeCheckFailed",
    "VLMRuntime",
    "assemble",
    "build_shortlist",
    "read_crop",
    "search_filter",
]
