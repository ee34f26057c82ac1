"""Re-ID evaluation metrics (CMC rank-k, mAP)."""

from chatreid.metrics.rank import compute_distmat, evaluate_rank

__all__ = ["compute_distmat", "evaluate_rank"]
