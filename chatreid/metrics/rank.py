"""Features to distances, and the standard protocol's CMC / mAP in torchreid's call shape.

The rules (same identity from the same camera is junk, distractors only cost rank, a query
with no valid match is skipped, ties keep gallery order) live in ``protocols``.
"""

from __future__ import annotations

import numpy as np

from chatreid.metrics.protocols import Labels, rank_metrics

__all__ = ["compute_distmat", "evaluate_rank"]


def compute_distmat(qf: np.ndarray, gf: np.ndarray) -> np.ndarray:
    """Cosine distance ``1 - cos(q, g)``, shape (num_query, num_gallery), float32.

    Rows are L2-normalised here, so unnormalised features are fine.
    """
    q = _unit_rows(np.asarray(qf, dtype=np.float32), "qf")
    g = _unit_rows(np.asarray(gf, dtype=np.float32), "gf")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature sizes differ: query {q.shape[1]}, gallery {g.shape[1]}")
    return 1.0 - q @ g.T


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """CMC curve (``cmc[k-1]`` = rank-k accuracy, length ``max_rank`` capped at the gallery
    size) and mAP under the standard protocol (see ``protocols.rank_metrics`` for the rest)."""
    m = rank_metrics(distmat, Labels(q_pids, q_camids), Labels(g_pids, g_camids), "standard",
                     max_rank=max_rank)
    return m.cmc, m.mAP


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-d (n, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero rows; cosine distance is undefined")
    return x / norms
