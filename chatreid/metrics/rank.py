"""Ranking metrics for Re-ID: CMC and mAP under the Market-1501 protocol.

Plain numpy, one query at a time, so every protocol rule can be checked line by line:

* the gallery is ranked by ascending distance (stable sort: ties keep gallery order);
* gallery entries showing the query's identity *from the query's camera* are dropped for that
  query: retrieving a near-duplicate from the same view is not re-identification;
* distractors (any pid that never equals a query's) stay in the gallery and only cost rank;
* a query whose identity is absent from what remains of the gallery is skipped (it has neither a
  first hit nor an average precision) and does not count towards the mean.
"""

from __future__ import annotations

import numpy as np

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
    """CMC curve (``cmc[k-1]`` = rank-k accuracy, length ``max_rank``) and mAP.

    ``max_rank`` is capped at the gallery size. Raises ``ValueError`` when no query has a valid
    match in the gallery (the metric would be undefined).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if q_pids.shape != (num_q,) or q_camids.shape != (num_q,):
        raise ValueError(f"q_pids and q_camids must have one entry per row ({num_q})")
    if g_pids.shape != (num_g,) or g_camids.shape != (num_g,):
        raise ValueError(f"g_pids and g_camids must have one entry per column ({num_g})")
    max_rank = min(max_rank, num_g)

    all_cmc, all_ap = [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        # same identity seen by the same camera: not a cross-camera match, drop it
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order][~junk] == q_pids[i]).astype(np.float64)
        if not hits.any():
            continue  # the identity is not in this query's gallery: no rank to measure
        all_cmc.append(_cmc(hits, max_rank))
        all_ap.append(_average_precision(hits))
    if not all_cmc:
        raise ValueError("no query has a cross-camera match in the gallery")
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def _cmc(hits: np.ndarray, max_rank: int) -> np.ndarray:
    """1 from the first correct match's rank onwards; padded with 1 when the filtered gallery is
    shorter than ``max_rank`` (a match exists, so the curve has already reached 1)."""
    curve = np.minimum(np.cumsum(hits), 1.0)[:max_rank]
    return np.pad(curve, (0, max_rank - len(curve)), constant_values=1.0)


def _average_precision(hits: np.ndarray) -> float:
    """Mean of precision@k over the ranks k that hold a correct match."""
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at_k * hits).sum() / hits.sum())


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-d (n, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero rows; cosine distance is undefined")
    return x / norms
