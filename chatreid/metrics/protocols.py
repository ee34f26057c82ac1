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

Ranks are counted, not sorted (all but ``single_gallery_shot``): every metric needs only each
hit's rank among the kept entries, i.e. 1 + the hits ahead of it + the kept non-hits with a lower
distance. The few same-identity entries are found from the labels and only the hits' distances
are sorted; one batched binary search of each row against its hits' distances ``d`` and
``nextafter(d, inf)`` then counts, per hit, the kept non-hits strictly below it and those equal
to it. Junk columns (junk identities, ``camera_junk``) are dropped before the search; junk entries
of the query's identity are searched like the rest and their counts subtracted. Where no kept
non-hit equals a hit, this is exactly the stable sort's order; a row where one does (gallery
order would decide) or where a hit's distance is not finite is scored by sorting it instead.
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
    return _rank_metrics(matrix, query, gallery, protocol, similarity=similarity,
                         max_rank=max_rank, chunk=chunk, seed=seed,
                         counted=not protocol.single_gallery_shot)


def mean_metrics(runs: Sequence[Metrics]) -> Metrics:
    """The average over trials (gallery draws, splits, directions), as the benchmarks report."""
    return Metrics(np.mean([r.cmc for r in runs], axis=0), float(np.mean([r.mAP for r in runs])),
                   float(np.mean([r.mINP for r in runs])), sum(r.queries for r in runs),
                   sum(r.skipped for r in runs))


def _rank_metrics(matrix: np.ndarray, query: Labels, gallery: Labels, protocol: Protocol, *,
                  similarity: bool, max_rank: int, chunk: int, seed: int,
                  counted: bool) -> Metrics:
    """``counted``: count ranks where the counts settle them (see the module docstring);
    otherwise sort every row, as ``single_gallery_shot`` needs (and the speed benchmark times)."""
    matrix = np.asarray(matrix)
    if matrix.shape != (len(query), len(gallery)):
        raise ValueError(f"matrix is {matrix.shape}, labels say {(len(query), len(gallery))}")
    if protocol.clothes != "any" and (query.clothes is None or gallery.clothes is None):
        raise ValueError(f"protocol {protocol.name} needs clothes ids for query and gallery")
    max_rank = min(max_rank, len(gallery))
    parts = [_chunk(matrix[s:s + chunk], _rows(query, s, chunk), gallery, protocol, similarity,
                    max_rank, seed, counted) for s in range(0, len(query), chunk)]
    ap = np.concatenate([p[1] for p in parts])
    scored = ~np.isnan(ap)
    if not scored.any():
        raise ValueError("no query has a valid match in the gallery")
    cmc = np.concatenate([p[0] for p in parts])[scored]
    inp = np.concatenate([p[2] for p in parts])[scored]
    return Metrics(cmc.mean(axis=0), float(ap[scored].mean()), float(inp.mean()),
                   int(scored.sum()), len(query) - int(scored.sum()))


def _rows(labels: Labels, start: int, n: int) -> Labels:
    s = slice(start, start + n)
    return Labels(labels.pids[s], labels.camids[s],
                  None if labels.clothes is None else labels.clothes[s])


def _pick(labels: Labels, rows: np.ndarray) -> Labels:
    return Labels(labels.pids[rows], labels.camids[rows],
                  None if labels.clothes is None else labels.clothes[rows])


_Scores = tuple[np.ndarray, np.ndarray, np.ndarray]  # cmc, AP, INP per row; NaN rows are skipped


def _chunk(block: np.ndarray, q: Labels, g: Labels, protocol: Protocol, similarity: bool,
           max_rank: int, seed: int, counted: bool) -> _Scores:
    dist = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    if similarity:
        dist = -dist  # reverses the order exactly, ties included
    if not counted:
        return _sorted_scores(dist, q, g, protocol, max_rank, seed)
    ranks, n_hits, redo = _hit_ranks(dist, q, g, protocol)
    cmc, ap, inp = _scores_from_ranks(ranks, n_hits, max_rank)
    if redo.any():
        rows = np.nonzero(redo)[0]
        cmc[rows], ap[rows], inp[rows] = _sorted_scores(dist[torch.from_numpy(rows)],
                                                        _pick(q, rows), g, protocol, max_rank,
                                                        seed)
    return cmc, ap, inp


def _scores_from_ranks(ranks: np.ndarray, n_hits: np.ndarray, max_rank: int) -> _Scores:
    """ranks[r, i]: 1-based rank among kept entries of row r's (i+1)-th hit, for i < n_hits[r]."""
    nth = np.arange(1, ranks.shape[1] + 1)
    real = nth[None, :] <= n_hits[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # rows without a hit become NaN
        ap = np.where(real, nth / np.maximum(ranks, 1), 0.0).sum(axis=1) / n_hits
        inp = n_hits / np.take_along_axis(ranks, np.maximum(n_hits - 1, 0)[:, None], 1)[:, 0]
    cmc = (ranks[:, :1] <= np.arange(1, max_rank + 1)[None, :]).astype(np.float64)
    none = n_hits == 0
    cmc[none], inp[none] = np.nan, np.nan
    return cmc, ap, inp


def _hit_ranks(dist: torch.Tensor, q: Labels, g: Labels,
               protocol: Protocol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's hit ranks in ranking order (padded), its hit count, and whether the counts
    cannot settle its order (a kept non-hit ties a hit, or a hit is not finite)."""
    n = len(q)
    rows, cols = _same_identity(q.pids, g.pids)
    junk = _same_identity_junk(rows, cols, q, g, protocol)
    values = dist[torch.from_numpy(rows), torch.from_numpy(cols)]
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for members, dropped in _column_groups(q, g, protocol):
        pick = np.nonzero(np.isin(rows, members))[0]
        pick = pick[~dropped[cols[pick]]]  # same-identity entries in a dropped column are junk
        if not (~junk[pick]).any():
            continue  # no row of the group has a hit: nothing to count
        d = dist if len(members) == n else dist[torch.from_numpy(members)]
        if dropped.any():
            d = d[:, torch.from_numpy(np.nonzero(~dropped)[0])]
        groups.append((members, *_counted_ranks(d, np.searchsorted(members, rows[pick]),
                                                values[torch.from_numpy(pick)], ~junk[pick])))
    ranks = np.zeros((n, max((r.shape[1] for _, r, _, _ in groups), default=1)), np.int64)
    n_hits, redo = np.zeros(n, np.int64), np.zeros(n, bool)
    for members, group_ranks, group_hits, group_redo in groups:
        ranks[members, :group_ranks.shape[1]] = group_ranks
        n_hits[members], redo[members] = group_hits, group_redo
    return ranks, n_hits, redo


def _counted_ranks(d: torch.Tensor, rows: np.ndarray, values: torch.Tensor,
                   hit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d``: distances of the group's rows to its kept columns; ``rows``, ``values``, ``hit``:
    the same-identity entries among them (row-sorted), hit or junk."""
    hits = _padded(rows[hit], values[torch.from_numpy(hit)], len(d)).sort(dim=1).values
    below, equal = _below_and_equal(d, _padded(rows, values, len(d)), hits)
    n_hits = np.bincount(rows[hit], minlength=len(d))
    real = torch.arange(hits.shape[1])[None, :] < torch.from_numpy(n_hits)[:, None]
    redo = (real & ((equal > 0) | ~torch.isfinite(hits))).any(dim=1).numpy()
    return (below + torch.arange(1, hits.shape[1] + 1)).numpy(), n_hits, redo


def _below_and_equal(d: torch.Tensor, same_id: torch.Tensor,
                     hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hit (``hits``: sorted, +inf padded), the kept non-hits with a lower and with an equal
    distance: all of ``d`` minus the same-identity entries ``same_id`` (hits and junk)."""
    up = torch.nextafter(hits, torch.tensor(torch.inf))
    bounds = torch.cat([hits, up], dim=1).sort(dim=1).values
    # an entry of distance x lands in bin k = #bounds <= x; x >= bound b iff k >= #bounds <= b,
    # so x == hit iff #bounds <= hit <= k < #bounds <= nextafter(hit)
    counts = _bin_counts(d, bounds) - _bin_counts(same_id, bounds)
    fewer = torch.cat([torch.zeros(len(d), 1, dtype=counts.dtype), counts.cumsum(dim=1)], dim=1)
    below = fewer.gather(1, torch.searchsorted(bounds, hits, right=True))
    return below, fewer.gather(1, torch.searchsorted(bounds, up, right=True)) - below


def _bin_counts(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per row, how many values have k bounds at or below them, k = 0 .. bounds.shape[1]. NaN
    lands in the last bin, above every finite hit, as it sorts."""
    at = torch.searchsorted(bounds, values, right=True)
    counts = torch.zeros(len(bounds), bounds.shape[1] + 1, dtype=torch.int64)
    return counts.scatter_add_(1, at, torch.ones(1, 1, dtype=torch.int64).expand_as(at))


def _padded(rows: np.ndarray, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Values of row-sorted entries as an (n_rows, most per row) tensor, +inf padded (last)."""
    per_row = np.bincount(rows, minlength=n_rows)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    out = torch.full((n_rows, max(int(per_row.max(initial=0)), 1)), torch.inf)
    out[torch.from_numpy(rows), torch.from_numpy(slot)] = values
    return out


def _same_identity(q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, gallery index) of every same-identity pair, row-major with ascending gallery
    index, from the labels alone: no dense comparison."""
    if not len(g_pids):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.argsort(g_pids, kind="stable")
    pids, starts, sizes = np.unique(g_pids[order], return_index=True, return_counts=True)
    slot = np.minimum(np.searchsorted(pids, q_pids), len(pids) - 1)
    per_row = np.where(pids[slot] == q_pids, sizes[slot], 0)
    offset = np.repeat(starts[slot] - (np.cumsum(per_row) - per_row), per_row)
    return (np.repeat(np.arange(len(q_pids)), per_row),
            order[np.arange(int(per_row.sum())) + offset])


def _same_identity_junk(rows: np.ndarray, cols: np.ndarray, q: Labels, g: Labels,
                        protocol: Protocol) -> np.ndarray:
    """Which same-identity pairs are junk by the camera and clothes rules (the junk identity and
    ``camera_junk`` rules drop whole columns: :func:`_column_groups`)."""
    junk = np.zeros(len(rows), dtype=bool)
    if protocol.same_camera_junk:
        junk |= g.camids[cols] == q.camids[rows]
    if protocol.clothes != "any":
        same = g.clothes[cols] == q.clothes[rows]  # pyright: ignore[reportOptionalSubscript]  (protocol.clothes needs them)
        junk |= same if protocol.clothes == "changed" else ~same
    return junk


def _column_groups(q: Labels, g: Labels,
                   protocol: Protocol) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows sharing the same junk columns, and those columns (a gallery mask): junk identities
    for everyone, plus ``camera_junk``'s cameras for queries of its cameras."""
    base = np.isin(g.pids, list(protocol.junk_pids))
    groups: list[tuple[np.ndarray, np.ndarray]] = []
    rest = np.ones(len(q), dtype=bool)
    for qcam, excluded in protocol.camera_junk.items():
        members = np.nonzero(q.camids == qcam)[0]
        if len(members):
            groups.append((members, base | np.isin(g.camids, list(excluded))))
            rest[members] = False
    if rest.any():
        groups.append((np.nonzero(rest)[0], base))
    return groups


def _sorted_scores(dist: torch.Tensor, q: Labels, g: Labels, protocol: Protocol, max_rank: int,
                   seed: int) -> _Scores:
    """Sort each row (stable: ties keep gallery order) and read the metrics off the ranking."""
    order = torch.argsort(dist, dim=1, stable=True).numpy()
    g_pids = g.pids[order]
    match = g_pids == q.pids[:, None]
    keep = ~_junk(order, match, g_pids, q, g, protocol)
    hits = match & keep
    valid = hits.any(axis=1)
    keep, hits = keep[valid], hits[valid]
    kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank among kept entries
    cum_hits = np.cumsum(hits, axis=1, dtype=np.int32)
    n_hits = cum_hits[:, -1].astype(np.float64)
    ranks_of_hits = np.where(hits, kept_rank, 0)
    first = np.where(hits, kept_rank, np.iinfo(np.int32).max).min(axis=1)
    cmc = np.full((len(q), max_rank), np.nan)
    ap, inp = np.full(len(q), np.nan), np.full(len(q), np.nan)
    ap[valid] = np.where(hits, cum_hits / np.maximum(kept_rank, 1), 0.0).sum(axis=1) / n_hits
    inp[valid] = n_hits / ranks_of_hits.max(axis=1)
    if protocol.single_gallery_shot:
        for i, row in enumerate(np.nonzero(valid)[0]):
            cmc[row] = _single_shot_cmc(order[row], keep[i], g, int(q.pids[row]),
                                        protocol.repeats, max_rank, seed)
    else:
        cmc[valid] = (first[:, None] <= np.arange(1, max_rank + 1)[None, :])
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
        same = g.clothes[order] == q.clothes[:, None]  # pyright: ignore[reportOptionalSubscript]  (as above)
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
