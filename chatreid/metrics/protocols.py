"""Re-ID evaluation protocols: CMC, mAP and mINP from a distance (or similarity) matrix.

One vectorised routine serves every benchmark; what differs between benchmarks is which gallery
entries are *junk* for a query (removed before ranking, counted neither as hit nor as miss):

* ``same_camera_junk``: the query's identity seen by the query's camera (Market-1501, MSMT17,
  CUHK03, LTCC, PRCC, SYSU-MM01): retrieving a near-duplicate view is not re-identification;
* ``junk_pids``: identities that are junk for everyone (Market-1501's ``-1``); distractors
  (``0``) stay and only cost rank;
* ``clothes``: ``"changed"`` junks the query identity's gallery entries in the query's clothes
  (LTCC / PRCC cloth-changing), ``"same"`` junks those in other clothes (same-clothes setting);
* ``camera_junk``: gallery cameras removed for queries of a camera (SYSU-MM01: camera 2 is in
  the same room as infrared camera 3, so it is removed for camera-3 queries);
* ``single_gallery_shot``: CUHK03's classic protocol - CMC averaged over ``repeats`` draws of one
  gallery entry per identity; AP from the whole ranking.

A query whose identity has no valid gallery entry left is skipped (no rank to measure) and the
number skipped is reported. Ties keep gallery order (stable sort). Sampled galleries and
trials (SYSU-MM01's 10 gallery draws, RegDB's 10 splits in both directions) are chosen by the
caller and averaged with :func:`mean_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass(frozen=True)
class Labels:
    """Identities, cameras and (optionally) clothes ids of the query or gallery items."""

    pids: np.ndarray
    camids: np.ndarray
    clothes: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("pids", "camids", "clothes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value).reshape(-1))
        n = len(self.pids)
        if len(self.camids) != n or (self.clothes is not None and len(self.clothes) != n):
            raise ValueError("pids, camids and clothes must have one entry per item")

    def __len__(self) -> int:
        return len(self.pids)


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    same_camera_junk: bool = True
    junk_pids: frozenset[int] = frozenset()
    clothes: Literal["any", "changed", "same"] = "any"
    camera_junk: Mapping[int, frozenset[int]] = field(default_factory=dict)
    single_gallery_shot: bool = False
    repeats: int = 10


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("standard", "same identity from the same camera is junk"),
    Protocol("market1501", "standard, plus identity -1 is junk (0 = distractors stay)",
             junk_pids=frozenset({-1})),
    Protocol("msmt17", "standard"),
    Protocol("cuhk03", "new 767/700 protocol: standard"),
    Protocol("cuhk03_classic", "single-gallery-shot CMC averaged over 10 draws",
             single_gallery_shot=True),
    Protocol("ltcc_general", "standard (all gallery clothes)"),
    Protocol("ltcc_cc", "cloth-changing: the identity in the query's clothes is junk too",
             clothes="changed"),
    Protocol("ltcc_same", "same-clothes: the identity in other clothes is junk",
             clothes="same"),
    Protocol("prcc", "standard over the chosen query set (same- or changed-clothes camera)"),
    Protocol("sysu_mm01", "standard, plus gallery camera 2 is junk for camera-3 queries",
             camera_junk={3: frozenset({2})}),
    Protocol("regdb", "cross-modality split: no camera junk", same_camera_junk=False),
    Protocol("text", "text-to-image: a caption has no camera, nothing is junk",
             same_camera_junk=False),
)}


@dataclass(frozen=True)
class Metrics:
    cmc: np.ndarray  # cmc[k-1] = rank-k accuracy
    mAP: float
    mINP: float
    queries: int  # queries scored
    skipped: int  # queries with no valid match

    def rank(self, k: int) -> float:
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def summary(self) -> dict[str, float]:
        return {"rank1": self.rank(1), "rank5": self.rank(5), "rank10": self.rank(10),
                "mAP": self.mAP, "mINP": self.mINP, "queries": self.queries,
                "skipped": self.skipped}


def rank_metrics(
    matrix: np.ndarray,
    query: Labels,
    gallery: Labels,
    protocol: Protocol | str = "standard",
    *,
    similarity: bool = False,
    max_rank: int = 50,
    chunk: int = 512,
    seed: int = 0,
) -> Metrics:
    """Score a (num_query, num_gallery) matrix: distances, or similarities with
    ``similarity=True``. Raises ``ValueError`` when no query has a valid match."""
    protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    matrix = np.asarray(matrix)
    if matrix.shape != (len(query), len(gallery)):
        raise ValueError(f"matrix is {matrix.shape}, labels say {(len(query), len(gallery))}")
    if protocol.clothes != "any" and (query.clothes is None or gallery.clothes is None):
        raise ValueError(f"protocol {protocol.name} needs clothes ids for query and gallery")
    max_rank = min(max_rank, len(gallery))
    parts = [_chunk(matrix[s:s + chunk], _rows(query, s, chunk), gallery, protocol, similarity,
                    max_rank, seed) for s in range(0, len(query), chunk)]
    cmc = np.concatenate([p[0] for p in parts])
    ap = np.concatenate([p[1] for p in parts])
    inp = np.concatenate([p[2] for p in parts])
    if len(ap) == 0:
        raise ValueError("no query has a valid match in the gallery")
    return Metrics(cmc.mean(axis=0), float(ap.mean()), float(inp.mean()), len(ap),
                   len(query) - len(ap))


def mean_metrics(runs: Sequence[Metrics]) -> Metrics:
    """The average over trials (gallery draws, splits, directions), as the benchmarks report."""
    return Metrics(np.mean([r.cmc for r in runs], axis=0), float(np.mean([r.mAP for r in runs])),
                   float(np.mean([r.mINP for r in runs])), sum(r.queries for r in runs),
                   sum(r.skipped for r in runs))


def _rows(labels: Labels, start: int, n: int) -> Labels:
    s = slice(start, start + n)
    return Labels(labels.pids[s], labels.camids[s],
                  None if labels.clothes is None else labels.clothes[s])


def _chunk(block: np.ndarray, q: Labels, g: Labels, protocol: Protocol, similarity: bool,
           max_rank: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    order = torch.argsort(-scores if similarity else scores, dim=1, stable=True).numpy()
    g_pids = g.pids[order]
    match = g_pids == q.pids[:, None]
    junk = _junk(order, match, g_pids, q, g, protocol)
    keep = ~junk
    hits = match & keep
    valid = hits.any(axis=1)
    keep, hits = keep[valid], hits[valid]
    kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank among kept entries
    cum_hits = np.cumsum(hits, axis=1, dtype=np.int32)
    n_hits = cum_hits[:, -1].astype(np.float64)
    ranks_of_hits = np.where(hits, kept_rank, 0)
    first = np.where(hits, kept_rank, np.iinfo(np.int32).max).min(axis=1)
    ap = (np.where(hits, cum_hits / np.maximum(kept_rank, 1), 0.0).sum(axis=1) / n_hits)
    inp = n_hits / ranks_of_hits.max(axis=1)
    if protocol.single_gallery_shot:
        cmc = np.stack([_single_shot_cmc(order[valid][i], keep[i], g, int(q.pids[valid][i]),
                                         protocol.repeats, max_rank, seed)
                        for i in range(len(first))]) if len(first) else np.zeros((0, max_rank))
    else:
        cmc = (first[:, None] <= np.arange(1, max_rank + 1)[None, :]).astype(np.float64)
    return cmc, ap, inp


def _junk(order: np.ndarray, match: np.ndarray, g_pids: np.ndarray, q: Labels, g: Labels,
          protocol: Protocol) -> np.ndarray:
    junk = np.zeros(order.shape, dtype=bool)
    if protocol.same_camera_junk or protocol.camera_junk:
        g_cams = g.camids[order]
        if protocol.same_camera_junk:
            junk |= match & (g_cams == q.camids[:, None])
        for qcam, excluded in protocol.camera_junk.items():
            rows = q.camids == qcam
            if rows.any():
                junk[rows] |= np.isin(g_cams[rows], list(excluded))
    if protocol.junk_pids:
        junk |= np.isin(g_pids, list(protocol.junk_pids))
    if protocol.clothes != "any":
        same = g.clothes[order] == q.clothes[:, None]  # type: ignore[index]
        junk |= match & (same if protocol.clothes == "changed" else ~same)
    return junk


def _single_shot_cmc(order: np.ndarray, keep: np.ndarray, g: Labels, pid: int, repeats: int,
                     max_rank: int, seed: int) -> np.ndarray:
    """CUHK03 classic: one random kept gallery entry per identity, first-hit rank averaged."""
    rng = np.random.default_rng(seed)
    kept = order[keep]
    pids = g.pids[kept]
    groups: dict[int, list[int]] = {}
    for pos, p in enumerate(pids.tolist()):
        groups.setdefault(p, []).append(pos)
    curve = np.zeros(max_rank)
    for _ in range(repeats):
        chosen = np.sort([positions[int(rng.integers(len(positions)))]
                          for positions in groups.values()])
        rank = int(np.nonzero(pids[chosen] == pid)[0][0]) + 1
        curve += (np.arange(1, max_rank + 1) >= rank)
    return curve / repeats


def sample_gallery(gallery: Labels, shots: int = 1, seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` random gallery entries per (identity, camera): SYSU-MM01's
    single-shot (1) and multi-shot (10) galleries, one draw per trial seed."""
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    keys = np.stack([gallery.pids, gallery.camids], axis=1)
    for key in np.unique(keys, axis=0):
        idx = np.nonzero((keys == key).all(axis=1))[0]
        picked += rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist()
    return np.sort(np.asarray(picked))
