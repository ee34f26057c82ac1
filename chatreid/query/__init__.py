"""Retrieval: what the serving replicas do, free of Ray Serve so it can be tested and reused.

- ``errors``: the clear failures a client sees (unknown crop, empty gallery, bad image, ...);
- ``shortlist``: the prefilter side - a query request in, the gallery's top K (filters, τ) out;
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
from chatreid.query.shortlist import Shortlist, Shortlister
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
    "Shortlister",
    "SmokeCheckFailed",
    "StorageUnavailable",
    "UnknownCrop",
    "VLMRuntime",
    "assemble",
    "read_crop",
]
