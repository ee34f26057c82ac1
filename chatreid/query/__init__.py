"""Retrieval: what the serving replicas do, free of Ray Serve so it can be tested and reused.

- ``errors``: the clear failures a client sees (unknown crop, empty gallery, bad image, ...);
- ``shortlist``: the prefilter step - a query request (its upload validated already) in, the
  gallery's top K (filters, τ) out;
- ``vlm``: the rerank side - a verified VLM checkpoint loaded, smoke-checked, asked to rerank
  a shortlist with the best-choice dialogue and, on request, to explain its top results;
- ``answer``: shortlist + rerank result -> the API's ``QueryResponse``.
"""

from chatreid.errors import (
    BadQuery,
    CropGone,
    EmptyGallery,
    ImageRejected,
    ModelUnavailable,
    StorageUnavailable,
    UnknownCrop,
)
from chatreid.query.answer import assemble
from chatreid.query.errors import read_crop
from chatreid.query.shortlist import Shortlist, build_shortlist, search_filter
from chatreid.query.vlm import ModelSpec, RerankAnswer, SmokeCheckFailed, VLMRuntime

__all__ = [
    "BadQuery",
    "CropGone",
    "EmptyGallery",
    "ImageRejected",
    "ModelSpec",
    "ModelUnavailable",
    "RerankAnswer",
    "Shortlist",
    "SmokeCheckFailed",
    "StorageUnavailable",
    "UnknownCrop",
    "VLMRuntime",
    "assemble",
    "build_shortlist",
    "read_crop",
    "search_filter",
]
