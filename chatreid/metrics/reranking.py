"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017): a training-free second pass over embedder features.

The steps, as in the paper (section 3-4), over all items ``P = query + gallery``:

1. ``d(p, q)``: squared Euclidean distance of L2-normalised features (``2 - 2 cos``), each row
   divided by its maximum so every item's neighbourhood has the same scale.
2. ``R(p, k)``: the k-reciprocal neighbours of ``p`` - items in ``p``'s k nearest whose own k
   nearest hold ``p`` (each list is the item itself plus k others, as in the reference code).
3. ``R*(p, k1)``: ``R(p, k1)`` plus ``R(c, k1/2)`` of each candidate ``c`` in it when at least
   2/3 of that smaller set is already in ``R(p, k1)`` (recovers positives that are hard only
   from ``p``'s side while keeping hard negatives out).
4. ``V_p``: a sparse vector over P, Gaussian-weighted ``exp(-d(p, g))`` on ``R*(p, k1)``,
   normalised to sum 1; then local query expansion averages ``V`` over ``p``'s top ``k2``.
5. Jaccard distance ``1 - sum min(V_p, V_g) / sum max(V_p, V_g)``; the final distance is
   ``(1 - lambda) * Jaccard + lambda * d``.

Memory: dense (N x N) float32 matrices with N = num_query + num_gallery (two or three alive at
once) - fine for the few thousand items of a benchmark split (5,000 items ~ 100 MB each); a
city-scale gallery would need the sparse form.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

__all__ = ["k_reciprocal_distances", "k_reciprocal_order"]

_ROW_CHUNK = 1024  # rows argsorted at once: bounds the int64 temporary to 8 * 1024 * N bytes


def k_reciprocal_distances(q_feats: np.ndarray, g_feats: np.ndarray, k1: int = 20, k2: int = 6,
                           lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked (num_query, num_gallery) float32 distance matrix (smaller = closer).

    Args:
        q_feats: (num_query, dim) query features; rows are L2-normalised here.
        g_feats: (num_gallery, dim) gallery features, same ``dim``.
        k1: size of the k-reciprocal neighbourhood (paper default 20); capped at N - 1.
        k2: neighbours averaged in local query expansion (default 6; 1 turns it off).
        lambda_value: weight of the original distance in the blend (default 0.3; 1 keeps the
            original ranking, 0 is pure Jaccard).

    Raises:
        ValueError: features not 2-d, empty, non-finite or all-zero rows; feature sizes that
            differ; ``k1 < 1``, ``k2 < 1`` or ``lambda_value`` outside [0, 1].
    """
    q = _unit_rows(q_feats, "q_feats")
    g = _unit_rows(g_feats, "g_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature sizes differ: query {q.shape[1]}, gallery {g.shape[1]}")
    if isinstance(k1, bool) or not isinstance(k1, (int, np.integer)) or k1 < 1:
        raise ValueError(f"k1 must be an integer >= 1, got {k1!r}")
    if isinstance(k2, bool) or not isinstance(k2, (int, np.integer)) or k2 < 1:
        raise ValueError(f"k2 must be an integer >= 1, got {k2!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")

    feats = np.concatenate([q, g])
    n, n_q = len(feats), len(q)
    k1, k2 = min(int(k1), n - 1), min(int(k2), n)
    dist = np.maximum(2.0 - 2.0 * (feats @ feats.T), 0.0)  # rounding can dip below 0
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)

    ranked = _nearest(dist, max(k1 + 1, k2))
    full = _reciprocal(ranked, k1)
    half = _reciprocal(ranked, round(k1 / 2))  # round half to even, as the reference code

    v = np.zeros((n, n), np.float32)
    for p in range(n):
        expanded = [full[p]]
        for c in full[p]:
            cand = half[c]
            if np.intersect1d(cand, full[p], assume_unique=True).size > 2 / 3 * cand.size:
                expanded.append(cand)
        members = np.unique(np.concatenate(expanded))
        weight = np.exp(-dist[p, members])
        v[p, members] = weight / weight.sum()
    if k2 > 1:  # local query expansion: each row becomes the mean of its top-k2 rows
        v = functools.reduce(operator.add, (v[ranked[:, j]] for j in range(k2))) / np.float32(k2)

    # rows of V sum to 1, so sum max(V_p, V_g) = 2 - sum min(V_p, V_g)
    v_gallery = v[n_q:]
    jaccard = np.empty((n_q, n - n_q), np.float32)
    for i in range(n_q):
        support = np.flatnonzero(v[i])  # min() is 0 off the query's support
        shared = np.minimum(v[i, support], v_gallery[:, support]).sum(axis=1)
        jaccard[i] = 1.0 - shared / (2.0 - shared)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:n_q, n_q:]
    return final.astype(np.float32, copy=False)


def k_reciprocal_order(query: np.ndarray, candidates: np.ndarray, *, k1: int, k2: int = 6,
                       lambda_value: float) -> np.ndarray:
    """One live query's candidates (its cosine top N) re-ordered by k-reciprocal encoding
    among themselves and the query: candidate positions, nearest first.

    The evaluation's peer row encodes every test query and the whole gallery at once
    (transductive); a query that arrives alone has only its own neighbourhood, so ``P`` here
    is the query plus its candidates. Fewer than two candidates keep their order.
    """
    candidates = np.asarray(candidates, np.float32)
    if len(candidates) < 2:
        return np.arange(len(candidates))
    dist = k_reciprocal_distances(np.asarray(query, np.float32).reshape(1, -1), candidates,
                                  k1=k1, k2=k2, lambda_value=lambda_value)[0]
    return np.argsort(dist, kind="stable")


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be 2-d (n >= 1, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero rows; their distance is undefined")
    return x / norms


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest columns, nearest first (stable: ties keep index order)."""
    return np.concatenate([np.argsort(dist[s:s + _ROW_CHUNK], axis=1, kind="stable")[:, :k]
                           for s in range(0, len(dist), _ROW_CHUNK)])


def _reciprocal(ranked: np.ndarray, k: int) -> list[np.ndarray]:
    """``R(p, k)`` for every item: its top k+1 (itself included) that hold it in theirs."""
    top = ranked[:, :k + 1]
    back = top[top]  # (n, k+1, k+1): the top lists of each item's neighbours
    mutual = (back == np.arange(len(top))[:, None, None]).any(axis=2)
    return [top[p][mutual[p]] for p in range(len(top))]
