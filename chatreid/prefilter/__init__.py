"""Prefilter vector store: cosine top-k with threshold and metadata filters over FAISS."""

from chatreid.prefilter.store import (
    FORMAT_VERSION,
    MODALITIES,
    AddReport,
    Hit,
    PrefilterStore,
    SearchFilter,
    VectorMeta,
    crop_id_to_int64,
    default_exact_max,
)

__all__ = [
    "FORMAT_VERSION",
    "MODALITIES",
    "AddReport",
    "Hit",
    "PrefilterStore",
    "SearchFilter",
    "VectorMeta",
    "crop_id_to_int64",
    "default_exact_max",
]
