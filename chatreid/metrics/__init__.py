"""Re-ID evaluation metrics: CMC rank-k, mAP and mINP under each benchmark's protocol."""

from chatreid.metrics.protocols import (
    PROTOCOLS,
    Labels,
    Metrics,
    Protocol,
    mean_metrics,
    rank_metrics,
    sample_gallery,
)
from chatreid.metrics.rank import compute_distmat, evaluate_rank
from chatreid.metrics.reranking import k_reciprocal_distances, k_reciprocal_order

__all__ = [
    "PROTOCOLS",
    "Labels",
    "Metrics",
    "Protocol",
    "compute_distmat",
    "evaluate_rank",
    "k_reciprocal_distances",
    "k_reciprocal_order",
    "mean_metrics",
    "rank_metrics",
    "sample_gallery",
]
