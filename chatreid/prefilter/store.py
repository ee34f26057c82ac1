"""FAISS vector store that prefilters retrieval candidates (cosine top-k cap K, threshold tau).

Design (the why):

* Rows are append-only and every index labels vectors by row number, so all index kinds (flat,
  IVF, HNSW, and their GPU copies) are appended to with a plain ``add`` and filtered with one
  bitmap selector over rows. The 64-bit crop ids live beside the rows, not inside faiss.
* The original L2-normalised float32 vectors live in one flat index: it is at once the exact
  index, the ground truth for calibration and the source for rebuilds and snapshots. With HNSW
  that flat index is the graph's own storage, so the vectors are still held (and saved) once.
* ``remove`` marks tombstones that searches exclude through the same bitmap; dead rows are
  compacted away (and the approximate index refilled) once they are a sizeable fraction.
* Above ``exact_max`` live vectors the store adds an approximate index: HNSW on CPU (at 1280-d
  and equal recall it measured ~5x faster per query than IVF on identity-clustered data, whose
  top-100 neighbours spread over many IVF lists), IVF-SQ8 with GPUs (no GPU HNSW). It only
  proposes candidates: their scores are recomputed exactly from the float32 vectors, so
  reported scores are true cosines and quantisation never reorders hits. Its search knob
  (nprobe / efSearch) is calibrated by measuring recall against exact search on held-out-like
  queries whenever the index is (re)built or the store has grown 4x.
* Filters are applied inside the search (faiss ``IDSelectorBitmap``); a filter that leaves few
  candidates is answered exactly, and any approximate answer that comes back short of k while
  more matches exist is redone exactly, so k filtered hits come back when they exist.
* ``index_kind="compressed"`` is for galleries that outgrow float vectors (1M crops x 512-d are
  2 GiB as float32): above ``exact_max`` the vectors are re-encoded once as 8-bit scalar codes
  (SQ8, one byte per dimension) and the floats dropped; candidates come from an IVF index of
  4-bit product-quantised codes (faiss fast-scan PQ, d/8 bytes per vector, scanned with SIMD)
  and are rescored from the SQ8 codes (cosine error ~1e-3). The IVF lists are split into
  ``partitions`` searched in parallel threads (one per core), because one query's list scan
  is single-threaded in faiss. L2 metric inside the IVF: on unit vectors it ranks like cosine
  and, unlike inner product, is blind to the large mean all person embeddings share, which
  wasted PQ's codebook (measured recall 0.73 -> 0.86 at the same cost). Once compressed, the
  store never goes back to floats (the codes cannot be decoded exactly).
* faiss-gpu and faiss-cpu run the same code: with GPUs the active index is cloned onto them
  (``index_cpu_to_all_gpus``) for unfiltered searches; the CPU copy stays authoritative.
  Fast-scan PQ has no GPU version: a compressed store searches on CPU.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from chatreid.prefilter.metas import Column, MetaTable, VectorMeta

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "compressed"]
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf", "compressed")
MODALITIES = frozenset({"rgb", "infrared"})
FORMAT_VERSION = 2  # 2: vector codec (float32 / sq8) and compressed partitions
_READABLE_VERSIONS = (1, 2)

_MAGIC = b"CRPFSTOR"  # 8 bytes; then u32 header length, JSON header, sections, sha256 trailer
_DIGEST_LEN = 32
_SECTIONS = ("vectors", "ids", "alive", "metas", "approx")

# Flat search is memory-bound: one query reads n*dim floats. ~24M floats (96 MiB) took ~5 ms per
# single query on 2 Sapphire Rapids cores, so the default exact_max keeps flat below that. A GPU
# reads ~3 TB/s (H100), so there ~4G floats (16 GiB, ~5 ms) stay exact (not measured here).
_FLAT_BUDGET_FLOATS = 24 * 2**20
_GPU_FLAT_BUDGET_FLOATS = 4 * 2**30
_MIN_EXACT_MAX = 2048
_IVF_MIN_ROWS = 2048  # fewer vectors cannot train a useful IVF; a forced "ivf" stays flat below
_IVF_TRAIN_PER_LIST = 48  # k-means sample per list (faiss warns below 39)
_RETRAIN_GROWTH = 4  # retrain IVF (nlist ~ 4 sqrt(n)) when n grows by this factor
# recall at a fixed knob falls as the store grows (HNSW 256-d: 0.97 at 100k -> 0.93 at 1M), so
# the knob is re-measured every 1.5x growth; that costs ~2 exact batch searches each time
_RECALIBRATE_GROWTH = 1.5
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 40  # half the build time of 80 at the same recall after calibration
_HNSW_MAX_EF = 4096
_CALIB_QUERIES = 100
_CALIB_K = 100
_RERANK = 2  # approximate candidates fetched per wanted hit, then rescored exactly
# 4-bit PQ codes only shortlist: at 1M x 512-d, 16 -> 32 candidates per hit took recall@100
# from 0.941 to 0.960 (+1 ms); the IVF lists probed, not the rescoring, bound the rest
_COMPRESSED_RERANK = 32
_PQ_DIMS_PER_SUBQUANTIZER = 4  # PQ(d/4)x4fs: half a byte per 4 dims, i.e. d/8 bytes per vector
_SQ_TRAIN = 100_000  # rows sampled to fit SQ8's per-dimension ranges
_SQ_MARGIN = 0.05  # ranges widened 5 % each side so later vectors rarely clip
_MAX_PARTITIONS = 8
_DECODE_CHUNK = 65_536  # rows decoded at a time when a rebuild streams SQ8 codes
_IVF_NPROBES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
_HNSW_EFS = (16, 32, 64, 128, 200, 256, 320, 384, 512, 768, 1024, 2048)
_COMPACT_MIN_DEAD = 1024
_COMPACT_FRACTION = 0.25
_SUBSET_BLAS_MIN_QUERIES = 8  # from this many queries a gathered BLAS scan beats per-query scans
_SUBSET_BLOCK = 8192  # rows gathered per BLAS block (8192 x 1280 floats = 40 MiB)
_GPU_MAX_K = 2048  # faiss GPU k limit


@dataclass(frozen=True)
class SearchFilter:
    """Metadata filter; ``None`` fields do not filter. The time window is inclusive."""

    cameras: frozenset[str] | None = None
    modality: str | None = None
    time_from: float | None = None
    time_to: float | None = None

    def __post_init__(self) -> None:
        if self.cameras is not None and not isinstance(self.cameras, frozenset):
            if isinstance(self.cameras, str):
                raise ValueError("SearchFilter.cameras must be a set of camera names, not a str")
            object.__setattr__(self, "cameras", frozenset(self.cameras))
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"SearchFilter.modality must be one of {sorted(MODALITIES)}, "
                             f"got {self.modality!r}")
        if (self.time_from is not None and self.time_to is not None
                and self.time_from > self.time_to):
            raise ValueError(
                f"SearchFilter time window is empty: {self.time_from} > {self.time_to}")

    @property
    def is_empty(self) -> bool:
        return (self.cameras is None and self.modality is None and self.time_from is None
                and self.time_to is None)


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    meta: VectorMeta


@dataclass(frozen=True)
class AddReport:
    added: int
    skipped: tuple[str, ...]  # crop ids already present (or repeated in the batch)


def crop_id_to_int64(crop_id: str) -> int:
    """Stable id: the first 8 bytes of sha256(crop_id), big-endian, as a positive int63."""
    digest = hashlib.sha256(crop_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def default_exact_max(dim: int, gpu: bool = False) -> int:
    """Largest store searched flat by default (see ``_FLAT_BUDGET_FLOATS``)."""
    return max(_MIN_EXACT_MAX, (_GPU_FLAT_BUDGET_FLOATS if gpu else _FLAT_BUDGET_FLOATS) // dim)


# -- small helpers ---------------------------------------------------------------------------


class _RWLock:
    """Readers-writer lock: readers share, writers are exclusive and preferred (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _as_unit_rows(array: Any, dim: int, what: str, *, allow_1d: bool) -> np.ndarray:
    """Validate a float matrix of shape (n, dim) and return it L2-normalised as float32."""
    arr = np.asarray(array)
    if arr.dtype.kind != "f":
        raise ValueError(f"{what} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim == 1 and allow_1d:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        want = f"({dim},) or (n, {dim})" if allow_1d else f"(n, {dim})"
        raise ValueError(f"{what} must have shape {want}, got {arr.shape}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5].tolist()
        raise ValueError(f"{what} contain NaN or Inf (rows {bad})")
    x = arr.astype(np.float32, copy=True)
    peak = np.abs(x).max(axis=1, keepdims=True) if len(x) else np.ones((0, 1), np.float32)
    if (peak == 0).any():
        bad = np.flatnonzero(peak[:, 0] == 0)[:5].tolist()
        raise ValueError(f"{what} contain all-zero rows (rows {bad}); cosine is undefined")
    x /= peak  # pre-scale so the norm cannot overflow float32
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x)


def _check_metas(metas: Sequence[VectorMeta]) -> None:
    for i, m in enumerate(metas):
        if not isinstance(m, VectorMeta):
            raise ValueError(f"metas[{i}] must be a VectorMeta, got {type(m).__name__}")
        if not isinstance(m.crop_id, str) or not m.crop_id:
            raise ValueError(f"metas[{i}].crop_id must be a non-empty str")
        if m.modality not in MODALITIES:
            raise ValueError(f"metas[{i}].modality must be one of {sorted(MODALITIES)}, "
                             f"got {m.modality!r}")
        if not isinstance(m.camera, str):
            raise ValueError(f"metas[{i}].camera must be a str")
        t = m.capture_time
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ValueError(f"metas[{i}].capture_time must be a finite number, got {t!r}")


def _bitmap_selector(mask: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """Selector over row numbers; the returned bits must stay alive while faiss uses it."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


def _sorted_hits(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k by score descending, ties broken by row so results are deterministic."""
    if len(rows) > 2 * k:  # keep every row tied with the k-th, then sort only those
        kth = -np.partition(-scores, k - 1)[k - 1]
        keep = scores >= kth
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def _check_kind(index_kind: str, dim: int, target_recall: float) -> None:
    if index_kind not in INDEX_KINDS:
        raise ValueError(f"index_kind must be one of {', '.join(INDEX_KINDS)}, got "
                         f"{index_kind!r}")
    if index_kind == "compressed" and _pq_subquantizers(dim) is None:
        raise ValueError(f"index_kind 'compressed' needs a dim with an even divisor near dim/4 "
                         f"(e.g. 256, 512, 1280), got {dim}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")


def _pq_subquantizers(dim: int) -> int | None:
    """Fast-scan PQ sub-quantiser count: an even divisor of dim, as near dim/4 as exists."""
    for m in range(max(2, dim // _PQ_DIMS_PER_SUBQUANTIZER), 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return None


def _nearest_pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _ivf_nlist(n: int, per_sqrt: float = 4.0) -> int:
    """IVF list count: ~per_sqrt * sqrt(n), a power of two, halved until k-means has enough
    training rows per list."""
    nlist = _nearest_pow2(per_sqrt * math.sqrt(n))
    while nlist > 16 and nlist * _IVF_TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


# -- the store -------------------------------------------------------------------------------


class PrefilterStore:
    """Cosine vector store with metadata filters, idempotent adds and exact/approximate search.

    ``index_kind``: ``"flat"`` is always exact; ``"auto"`` is exact up to ``exact_max`` live
    vectors and approximate above: HNSW on CPU (measured fastest at equal recall), IVF-SQ8 with
    GPUs (HNSW has no GPU version); ``"ivf"`` uses IVF-SQ8 as soon as it can be trained
    (2048 vectors); ``"hnsw"`` uses HNSW-Flat from the first vector; ``"compressed"`` is exact
    up to ``exact_max`` and above it keeps SQ8 codes instead of floats and searches IVF-PQ
    fast-scan ``partitions`` in parallel (under 1 KB per 512-d vector; see the module notes).
    Thread-safe: searches run in parallel, writes are exclusive.
    """

    def __init__(self, dim: int, *, exact_max: int | None = None, index_kind: IndexKind = "auto",
                 use_gpu: bool | None = None, target_recall: float = 0.97,
                 partitions: int | None = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _check_kind(index_kind, dim, target_recall)
        if partitions is not None and not 1 <= partitions <= _MAX_PARTITIONS:
            raise ValueError(f"partitions must be in 1..{_MAX_PARTITIONS}, got {partitions!r}")
        self.dim = dim
        self._use_gpu = _resolve_gpu(use_gpu)
        self.exact_max = (default_exact_max(dim, self._use_gpu) if exact_max is None
                          else int(exact_max))
        self.index_kind: IndexKind = index_kind
        self.target_recall = float(target_recall)
        # one per core: a query's partitions are scanned in parallel threads
        self.partitions = partitions or max(1, min(faiss.omp_get_max_threads(), _MAX_PARTITIONS))
        self.offsets: dict[str, int] = {}
        self._sq8 = False  # True once the vectors are SQ8 codes (compressed kind, for good)
        self._parts: list[faiss.Index] = []  # the compressed kind's IVF partitions
        self._lock = _RWLock()
        self._reset_rows()
        self._approx: faiss.Index | None = None
        self._approx_kind = "flat"
        self._knob = 0  # nprobe (IVF) or efSearch (HNSW)
        self._trained_rows = 0  # live vectors when the approximate index was last (re)trained
        self._calibrated_rows = 0  # live vectors when the knob was last measured
        self._gpu: faiss.Index | None = None

    def reconfigure(self, index_kind: IndexKind, target_recall: float) -> None:
        """Take this deployment's settings after a snapshot restore; they apply from the next
        add (a compressed store stays compressed: its codes cannot feed a float index)."""
        _check_kind(index_kind, self.dim, target_recall)
        with self._lock.write():
            self.index_kind, self.target_recall = index_kind, float(target_recall)

    def _reset_rows(self) -> None:
        if self._sq8:  # an empty SQ8 index with the same trained ranges (no copy of the codes)
            flat = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
            flat.sq, flat.is_trained = self._flat.sq, True  # pyright: ignore[reportAttributeAccessIssue]
            self._flat = flat
        else:
            self._flat = faiss.IndexFlatIP(self.dim)
        self._flat_in_graph = False  # True: _flat is the HNSW's own storage (one copy of vectors)
        self._ids = Column(np.int64)
        self._alive = Column(np.bool_)
        self._metas = MetaTable()
        self._row_of: dict[int, int] = {}  # live id -> row
        self._n_dead = 0

    # -- introspection -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, crop_id: object) -> bool:
        if not isinstance(crop_id, str):
            return False
        with self._lock.read():
            return self._live_row(crop_id) is not None

    def __repr__(self) -> str:
        return (f"PrefilterStore(dim={self.dim}, n={len(self)}, kind={self.active_kind!r}, "
                f"exact_max={self.exact_max}, gpu={self._use_gpu})")

    @property
    def active_kind(self) -> str:
        """The index searches use now: ``flat``, ``ivf`` or ``hnsw``."""
        return self._approx_kind if self._approx is not None else "flat"

    @property
    def search_knob(self) -> int:
        """Calibrated nprobe (IVF) or efSearch (HNSW); 0 when flat."""
        return self._knob if self._approx is not None else 0

    def set_search_knob(self, knob: int) -> None:
        """Override the calibrated nprobe (IVF) / efSearch (HNSW), e.g. to trade recall for
        latency; the next (re)build recalibrates."""
        if self._approx is None:
            raise ValueError("the store is searched flat (exact): there is no knob to set")
        if isinstance(knob, bool) or not isinstance(knob, int) or knob < 1:
            raise ValueError(f"knob must be a positive int, got {knob!r}")
        with self._lock.write():
            self._knob = knob
            if self._gpu is not None and self._approx_kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", knob)

    def index_info(self) -> dict[str, Any]:
        """What searches use now, for logs, metrics and benchmarks."""
        with self._lock.read():
            info: dict[str, Any] = {
                "kind": self.active_kind, "vectors": len(self), "rows": self._flat.ntotal,
                "exact_max": self.exact_max, "knob": self.search_knob,
                "trained_vectors": self._trained_rows,
                "calibrated_vectors": self._calibrated_rows, "gpu": self._gpu is not None,
                "vector_codec": "sq8" if self._sq8 else "float32",
            }
            if self._approx is not None and self._approx_kind in ("ivf", "compressed"):
                info["nlist"] = self._nlist()
            if self._approx is not None and self._approx_kind == "compressed":
                info["partitions"] = len(self._parts)
                info["candidates_per_hit"] = _COMPRESSED_RERANK
            return info

    def _nlist(self) -> int:
        index = self._parts[0] if self._approx_kind == "compressed" else self._approx
        assert index is not None  # only asked while an IVF index exists
        return faiss.extract_index_ivf(index).nlist

    def get_meta(self, crop_id: str) -> VectorMeta | None:
        with self._lock.read():
            row = self._live_row(crop_id)
            return None if row is None else self._metas[row]

    def live_metas(self) -> list[VectorMeta]:
        """Metadata of every live vector, in insertion order (what a rebuild re-embeds)."""
        with self._lock.read():
            return self._metas.rows(sorted(self._row_of.values()))

    def newest(self, k: int, filters: SearchFilter | None = None,
               exclude: set[str] | frozenset[str] = frozenset()) -> list[VectorMeta]:
        """The ``k`` most recent live crops inside ``filters`` (ties by crop id), skipping
        ``exclude``: the shortlist of a query that has no image to search with."""
        with self._lock.read():
            mask = self._selection(filters)
            rows = (np.arange(len(self._metas)) if mask is None else np.flatnonzero(mask))
            times = self._metas.times.view[rows]
            order = np.argsort(-times, kind="stable")
            cut = min(len(rows), k + len(exclude))
            if cut < len(rows):  # also keep every row tied with the last one taken
                cut = int(np.searchsorted(-times[order], -times[order[cut - 1]], "right"))
            metas = self._metas.rows(rows[order[:cut]])
        metas = [m for m in metas if m.crop_id not in exclude]
        metas.sort(key=lambda m: (-m.capture_time, m.crop_id))
        return metas[:k]

    def crop_ids(self) -> set[str]:
        """Every live crop id (to compare two stores' coverage)."""
        with self._lock.read():
            return {self._metas.crop_id(row) for row in self._row_of.values()}

    def similarity(self, query: np.ndarray, crop_ids: Sequence[str]) -> np.ndarray:
        """Cosine of ``query`` to each named crop's stored vector; NaN for crops not held."""
        q = _as_unit_rows(query, self.dim, "query", allow_1d=True)[0]
        out = np.full(len(crop_ids), np.nan, np.float32)
        with self._lock.read():
            where, rows = self._held(crop_ids)
            out[where] = self._vectors(rows) @ q
        return out

    def vectors(self, crop_ids: Sequence[str]) -> np.ndarray:
        """(len(crop_ids), dim) stored unit vectors (decoded from their codes when
        compressed); NaN rows for crops not held."""
        out = np.full((len(crop_ids), self.dim), np.nan, np.float32)
        with self._lock.read():
            where, rows = self._held(crop_ids)
            out[where] = self._vectors(rows)
        return out

    @property
    def colour_dim(self) -> int:
        """Length of the stored colour vectors; 0 while no crop brought one."""
        return self._metas.colour_dim

    def colours(self, crop_ids: Sequence[str]) -> np.ndarray:
        """(len(crop_ids), colour_dim) colour vectors; NaN rows for crops not held or held
        without one."""
        with self._lock.read():
            out = np.full((len(crop_ids), self._metas.colour_dim), np.nan, np.float32)
            where, rows = self._held(crop_ids)
            out[where] = self._metas.colours(rows)
        return out

    def _held(self, crop_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``crop_ids`` of the crops held, their rows); hold a lock."""
        rows = [self._live_row(c) for c in crop_ids]
        where = [i for i, r in enumerate(rows) if r is not None]
        return (np.array(where, np.int64),
                np.array([rows[i] for i in where], np.int64))

    def _live_row(self, crop_id: str) -> int | None:
        row = self._row_of.get(crop_id_to_int64(crop_id))
        if row is None or self._metas.crop_id(row) != crop_id:
            return None
        return row

    def memory_bytes(self) -> int:
        """Approximate resident bytes: vectors, approximate index, metadata (Python included)."""
        with self._lock.read():
            n = self._flat.ntotal
            total = n * self._flat.code_size  # pyright: ignore[reportAttributeAccessIssue]  # 4 B a dim as float32, 1 as SQ8
            total += self._ids.nbytes + self._alive.nbytes + self._metas.nbytes
            total += self._approx_bytes()
            total += self._python_bytes()
            return total

    def _approx_bytes(self) -> int:
        if self._approx is None:
            return 0
        if self._approx_kind in ("ivf", "compressed"):
            total = 0
            for index in self._parts or [self._approx]:
                ivf = faiss.extract_index_ivf(index)
                total += ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * self.dim * 4
            return total
        # its vectors are _flat's, already counted (hnsw: a field of the HNSW SWIG class)
        hnsw = self._approx.hnsw  # pyright: ignore[reportAttributeAccessIssue]
        return hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4

    def _python_bytes(self) -> int:
        # the id -> row dict: its slot table plus a boxed int key and value per live row
        return sys.getsizeof(self._row_of) + len(self._row_of) * 2 * 32

    # -- writes --------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, metas: Sequence[VectorMeta],
            colours: np.ndarray | None = None) -> int:
        """Add vectors (ids from ``meta.crop_id``); returns how many were new. ``colours``:
        the crops' colour-attribute vectors (NaN rows for crops without one)."""
        return self.add_with_report(vectors, metas, colours).added

    def add_with_report(self, vectors: np.ndarray, metas: Sequence[VectorMeta],
                        colours: np.ndarray | None = None) -> AddReport:
        """Like ``add`` but also names the crop ids skipped because they were already present."""
        metas = list(metas)
        x = _as_unit_rows(vectors, self.dim, "vectors", allow_1d=False)
        if len(x) != len(metas):
            raise ValueError(f"got {len(x)} vectors but {len(metas)} metas")
        _check_metas(metas)
        if colours is not None:
            colours = np.asarray(colours, np.float32)
            if colours.shape[:1] != (len(metas),) or colours.ndim != 2 \
                    or np.isinf(colours).any():
                raise ValueError(f"colours must be a ({len(metas)}, dim) float array without "
                                 f"inf, got shape {colours.shape}")
            if self._metas.colour_dim and colours.shape[1] != self._metas.colour_dim:
                raise ValueError(f"colour vectors have {colours.shape[1]} values, the store's "
                                 f"{self._metas.colour_dim}")
        ids = [crop_id_to_int64(m.crop_id) for m in metas]
        with self._lock.write():
            keep, skipped = self._new_rows(ids, metas)
            if keep:
                self._append(x[keep], [ids[i] for i in keep], [metas[i] for i in keep],
                             None if colours is None else colours[keep])
        if skipped:
            log.debug("prefilter add skipped %d crop ids already present", len(skipped))
        return AddReport(added=len(keep), skipped=tuple(skipped))

    def _new_rows(self, ids: list[int], metas: list[VectorMeta]) -> tuple[list[int], list[str]]:
        """Indices of the batch to insert; raises (before any change) on an id collision."""
        keep: list[int] = []
        skipped: list[str] = []
        seen: dict[int, str] = {}
        for i, (id_, meta) in enumerate(zip(ids, metas, strict=True)):
            row = self._row_of.get(id_)
            owner = self._metas.crop_id(row) if row is not None else seen.get(id_)
            if owner is None:
                seen[id_] = meta.crop_id
                keep.append(i)
            elif owner == meta.crop_id:
                skipped.append(meta.crop_id)
            else:
                raise ValueError(f"crop ids {owner!r} and {meta.crop_id!r} hash to the same "
                                 f"64-bit id {id_}")
        return keep, skipped

    def _append(self, x: np.ndarray, ids: list[int], metas: list[VectorMeta],
                colours: np.ndarray | None) -> None:
        first = self._flat.ntotal
        in_graph = self._flat_in_graph
        target = self._approx if in_graph else self._flat  # HNSW adds to its storage itself
        assert target is not None  # in_graph: _flat is the graph's storage
        target.add(x)
        self._ids.extend(np.asarray(ids, dtype=np.int64))
        self._alive.extend(np.ones(len(ids), dtype=np.bool_))
        self._metas.extend(metas, colours)
        self._row_of.update(zip(ids, range(first, first + len(ids)), strict=True))
        if not self._reindex():  # not rebuilt: append the new rows to the live indexes
            if self._approx is not None and not in_graph:
                self._approx_add(x, first)
            if self._gpu is not None:
                self._gpu.add(x)

    def _approx_add(self, x: np.ndarray, first: int) -> None:
        """Add rows ``first..`` to the approximate index (labels stay row numbers)."""
        assert self._approx is not None
        if not self._parts:
            self._approx.add(x)
            return
        rows = np.arange(first, first + len(x), dtype=np.int64)
        for j, part in enumerate(self._parts):  # row r lives in partition r % partitions
            pick = rows % len(self._parts) == j
            part.add_with_ids(x[pick], rows[pick])
        self._approx.syncWithSubIndexes()  # pyright: ignore[reportAttributeAccessIssue]

    def remove(self, crop_ids: Sequence[str]) -> int:
        """Remove crops by id; unknown ids are ignored. Returns how many were removed."""
        if isinstance(crop_ids, str):
            raise ValueError("remove() takes a sequence of crop ids, not a single str")
        removed = 0
        with self._lock.write():
            for crop_id in crop_ids:
                row = self._live_row(crop_id)
                if row is None:
                    continue
                del self._row_of[int(self._ids.view[row])]
                self._alive.view[row] = False
                self._n_dead += 1
                removed += 1
            if removed and self._n_dead >= max(_COMPACT_MIN_DEAD,
                                               _COMPACT_FRACTION * self._flat.ntotal):
                self._compact()
        return removed

    def compact(self) -> int:
        """Drop removed rows now instead of at the dead-row threshold: a snapshot must not
        carry erased vectors and metadata. Returns the rows dropped."""
        with self._lock.write():
            dead = self._n_dead
            if dead:
                self._compact()
            return dead

    def _compact(self) -> None:
        """Drop dead rows, renumber, and refill (or drop) the approximate index."""
        keep = np.flatnonzero(self._alive.view)
        if self._sq8:  # move the codes themselves: decoding and re-encoding would drift
            codes = self._codes()[keep].copy()
        else:
            x = self._xb()[keep].copy()
        ids, metas = self._ids.view[keep], self._metas.take(keep)
        self._reset_rows()
        if self._sq8:
            self._flat.add_sa_codes(codes)  # pyright: ignore[reportAttributeAccessIssue]
        else:
            self._flat.add(x)
        self._ids = Column(np.int64, ids)
        self._alive = Column(np.bool_, np.ones(len(keep), np.bool_))
        self._metas = metas
        self._row_of = {int(i): r for r, i in enumerate(ids.tolist())}
        log.info("prefilter store compacted to %d rows", len(keep))
        if self._reindex():
            return
        if self._approx_kind in ("ivf", "compressed") and self._approx is not None:
            for index in self._parts or [self._approx]:
                index.reset()  # keeps the trained quantiser and SQ/PQ codebooks
            for start, x in self._row_chunks():
                self._approx_add(x, start)
        elif self._approx is not None:  # an HNSW graph cannot drop nodes: rebuild it
            self._build_approx(self._approx_kind)
            return
        self._sync_gpu()

    # -- index choice, building, calibration ---------------------------------------------------
    def _wanted_kind(self) -> str:
        n = len(self._row_of)
        if self._sq8:  # 8-bit codes cannot feed a float index: compressed for good
            return "compressed"
        if self.index_kind == "flat":
            return "flat"
        if self.index_kind == "hnsw":
            return "hnsw" if n else "flat"
        if self.index_kind == "ivf":
            return "ivf" if n >= _IVF_MIN_ROWS else "flat"
        if self.index_kind == "compressed":  # codes cannot go back to floats: no hysteresis
            return "compressed" if n > self.exact_max and n >= _IVF_MIN_ROWS else "flat"
        if n > self.exact_max:
            return "ivf" if self._use_gpu else "hnsw"
        # hysteresis: once approximate, only go back to flat well below the threshold
        keep = self._approx is not None and n > self.exact_max // 2
        return self._approx_kind if keep else "flat"

    def _reindex(self) -> bool:
        """Migrate/retrain/recalibrate after the rows changed; True when indexes were rebuilt."""
        want = self._wanted_kind()
        n = len(self._row_of)
        grown = n >= _RETRAIN_GROWTH * max(self._trained_rows, 1)
        if want == "flat":
            if self._approx is None:
                return False
            self._detach_flat()
            self._approx, self._approx_kind, self._trained_rows = None, "flat", 0
            self._calibrated_rows = 0
            self._sync_gpu()
            return True
        retrain = want in ("ivf", "compressed") and grown
        if self._approx is None or self._approx_kind != want or retrain:
            self._detach_flat()
            self._build_approx(want)
            return True
        if n >= _RECALIBRATE_GROWTH * max(self._calibrated_rows, 1):
            self._calibrate()  # the index already holds the rows; only the knob changes
        return False

    def _detach_flat(self) -> None:
        """Give _flat its own copy of the vectors before the HNSW graph owning them goes away."""
        if self._flat_in_graph:
            flat = faiss.IndexFlatIP(self.dim)
            flat.add(self._xb())
            self._flat, self._flat_in_graph = flat, False

    def _build_approx(self, kind: str) -> None:
        if kind == "compressed":
            self._build_compressed()
            return
        xb = self._xb()
        if kind == "ivf":
            index = self._train_ivf(xb)
        else:
            index = faiss.IndexHNSWFlat(self.dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        index.add(xb)  # every row, dead ones included, so labels stay row numbers
        if kind == "hnsw":  # the graph copied the vectors into its storage: keep only that copy
            self._flat = faiss.downcast_index(index.storage)  # pyright: ignore[reportAttributeAccessIssue]
            self._flat_in_graph = True
        self._approx, self._approx_kind = index, kind
        self._parts = []
        self._built()

    def _built(self) -> None:
        self._trained_rows = len(self._row_of)
        self._calibrate()
        self._sync_gpu()
        log.info("prefilter store built %s index over %d vectors (knob %d)", self._approx_kind,
                 len(self._row_of), self._knob)

    def _build_compressed(self) -> None:
        """SQ8-encode the vectors (first time only), then train and fill the IVF-PQ partitions."""
        live = np.flatnonzero(self._alive.view)
        rng = np.random.default_rng(len(live))  # deterministic for a given store
        if not self._sq8:
            sample = self._vectors(np.sort(rng.choice(live, min(len(live), _SQ_TRAIN),
                                                      replace=False)))
            sq = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
            sq.sq.rangestat, sq.sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, _SQ_MARGIN
            sq.train(sample)
            for _, x in self._row_chunks():
                sq.add(x)
            self._use_codes(sq)  # the float vectors are freed here
        # fewer, larger lists than plain IVF: one query probes ~40 % of them on this data
        nlist = _ivf_nlist(len(live), per_sqrt=1.0)
        sample = self._vectors(np.sort(rng.choice(live, min(len(live), nlist * _IVF_TRAIN_PER_LIST),
                                                  replace=False)))
        m = _pq_subquantizers(self.dim)
        assert m is not None  # checked when the store was made
        proto = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(self.dim), self.dim, nlist, m, 4,
                                         faiss.METRIC_L2)
        proto.train(sample)
        self._parts = [faiss.clone_index(proto) for _ in range(self.partitions)]
        shards = faiss.IndexShards(self.dim, True, False)  # pyright: ignore[reportCallIssue]  # threaded, keep row labels
        for part in self._parts:
            shards.add_shard(part)
        self._approx, self._approx_kind = shards, "compressed"
        for start, x in self._row_chunks():
            self._approx_add(x, start)
        self._built()

    def _use_codes(self, sq: faiss.IndexScalarQuantizer) -> None:
        """Make SQ8 codes the stored vectors; keep their decode as ``lo + (code + 1/2) step``."""
        trained = faiss.vector_to_array(sq.sq.trained).astype(np.float32)
        self._sq_affine = (trained[: self.dim], trained[self.dim :] / 255.0)
        self._flat, self._sq8 = sq, True

    def _row_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 vectors) over every row, dead ones included, a chunk at a time."""
        n = self._flat.ntotal
        for start in range(0, n, _DECODE_CHUNK):
            yield start, self._vectors(np.arange(start, min(n, start + _DECODE_CHUNK)))

    def _train_ivf(self, xb: np.ndarray) -> faiss.Index:
        live = np.flatnonzero(self._alive.view)
        nlist = _ivf_nlist(len(live))
        rng = np.random.default_rng(len(live))  # deterministic for a given store
        n_train = min(len(live), nlist * _IVF_TRAIN_PER_LIST)
        sample = xb[np.sort(rng.choice(live, n_train, replace=False))]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist,
                                              faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere, like the data
        index.train(sample)
        return index

    def _calibrate(self) -> None:
        """Pick the cheapest knob whose recall@k vs exact search reaches ``target_recall``."""
        live = np.flatnonzero(self._alive.view)
        k = min(_CALIB_K, len(live))
        mask = self._alive.view if self._n_dead else None
        queries = self._calibration_queries(live, mask)
        truth = [set(r.tolist()) for r, _ in self._exact(queries, k, mask)]
        if self._approx_kind in ("ivf", "compressed"):
            nlist = self._nlist()
            knobs = (*(p for p in _IVF_NPROBES if p < nlist), nlist)
        else:  # searches use efSearch >= candidates wanted, so only such values are measurable
            knobs = tuple(e for e in _HNSW_EFS if e >= k * _RERANK) or (k * _RERANK,)
        for knob in knobs:
            found = self._approx_topk(queries, k, mask, len(live), knob)
            recall = np.mean([len(t & set(r.tolist())) / len(t)
                              for t, (r, _) in zip(truth, found, strict=True)])
            if recall >= self.target_recall:
                break
        self._knob, self._calibrated_rows = knob, len(live)
        log.info("prefilter %s calibrated: knob %d gives recall@%d %.3f", self._approx_kind,
                 knob, k, recall)

    def _calibration_queries(self, live: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Unseen queries that look like fresh samples of a stored neighbourhood.

        For an anchor a and three of its near neighbours b, c, d: (a + b)/2 + (c - d)/2, i.e.
        the local centre plus one local difference, which has about the spread of a new crop
        of the same person. Stored vectors themselves (or plain midpoints) are closer to the
        data than real queries and made the knob too small (recall 0.93 instead of 0.97).
        """
        rng = np.random.default_rng(len(live) + 1)
        anchors = np.sort(rng.choice(live, min(_CALIB_QUERIES, len(live)), replace=False))
        near = self._exact(self._vectors(anchors), min(11, len(live)), mask)
        picks = np.empty((len(anchors), 4), np.int64)
        for i, (a, (rows, _)) in enumerate(zip(anchors, near, strict=True)):
            others = rows[rows != a]
            if len(others) < 3:
                others = np.concatenate([others, [a, a, a]])
            picks[i] = (a, *rng.choice(others, 3, replace=False))
        v = self._vectors(picks.reshape(-1)).reshape(len(anchors), 4, self.dim)
        queries = v[:, 0] + v[:, 1] + v[:, 2] - v[:, 3]
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        return queries / np.where(norms > 0, norms, 1.0)

    def _sync_gpu(self) -> None:
        """(Re)clone the active index onto the GPUs; HNSW and fast-scan PQ (compressed) have
        no GPU version and stay on CPU."""
        self._gpu = None
        if not self._use_gpu or (self._approx_kind in ("hnsw", "compressed")
                                 and self._approx is not None):
            return
        source = self._approx if self._approx is not None else self._flat
        self._gpu = faiss.index_cpu_to_all_gpus(source)
        if self._approx is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self._knob)

    def _xb(self) -> np.ndarray:
        """Zero-copy view of the stored vectors; valid only until the next write (hold a lock)."""
        n = self._flat.ntotal
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        xb = self._flat.get_xb()  # pyright: ignore[reportAttributeAccessIssue]
        return faiss.rev_swig_ptr(xb, n * self.dim).reshape(n, self.dim)

    def _codes(self) -> np.ndarray:
        """Zero-copy view of the SQ8 codes (compressed); valid only until the next write."""
        n, size = self._flat.ntotal, self._flat.code_size  # pyright: ignore[reportAttributeAccessIssue]
        if n == 0:
            return np.empty((0, size), np.uint8)
        codes = self._flat.codes.data()  # pyright: ignore[reportAttributeAccessIssue]
        return faiss.rev_swig_ptr(codes, n * size).reshape(n, size)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """Float32 vectors of ``rows`` (a copy; decoded from SQ8 when compressed); hold a lock."""
        if self._sq8:
            return self._flat.sa_decode(np.ascontiguousarray(self._codes()[rows]))
        return self._xb()[rows]

    # -- search --------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, tau: float | None = None,
               filters: SearchFilter | None = None, exact: bool = False) -> list[list[Hit]]:
        """Top-k cosine hits per query, best first; ``tau`` drops hits scoring below it.

        Filters restrict the candidates before top-k. ``exact=True`` bypasses the approximate
        index (ground truth, audits).
        """
        q = _as_unit_rows(queries, self.dim, "queries", allow_1d=True)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if tau is not None and not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau!r}")
        if filters is not None and not isinstance(filters, SearchFilter):
            raise ValueError(f"filters must be a SearchFilter, got {type(filters).__name__}")
        with self._lock.read():
            found = self._search_rows(q, int(k), filters, exact)
            return [self._hits(rows, scores, tau) for rows, scores in found]

    def _hits(self, rows: np.ndarray, scores: np.ndarray, tau: float | None) -> list[Hit]:
        scores = np.clip(scores, -1.0, 1.0)
        if tau is not None:
            keep = scores >= tau
            rows, scores = rows[keep], scores[keep]
        ids = self._ids.view[rows].tolist()
        return [Hit(id=i, score=s, meta=m) for i, s, m in
                zip(ids, scores.tolist(), self._metas.rows(rows), strict=True)]

    def _search_rows(self, q: np.ndarray, k: int, filters: SearchFilter | None,
                     exact: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        mask = self._selection(filters)
        m = len(self._row_of) if mask is None else int(np.count_nonzero(mask))
        if m == 0:
            empty = (np.empty(0, np.int64), np.empty(0, np.float32))
            return [empty] * len(q)
        k = min(k, m)
        if exact or self._approx is None or (mask is not None and m <= self.exact_max):
            return self._exact(q, k, mask)
        return self._approximate(q, k, mask, m)

    def _selection(self, filters: SearchFilter | None) -> np.ndarray | None:
        """Boolean mask over rows of live rows passing the filter; None when that is every row."""
        alive = self._alive.view if self._n_dead else None
        if filters is None or filters.is_empty:
            return alive
        metas = self._metas
        parts = [] if alive is None else [alive]
        if filters.cameras is not None:
            codes = metas.camera_names.codes
            lut = np.zeros(len(codes) + 1, np.bool_)
            lut[[codes[c] for c in filters.cameras if c in codes]] = True
            parts.append(np.take(lut, metas.cams.view))  # intp codes: 2x faster than int32
        if filters.modality is not None:
            parts.append(metas.mods.view == (filters.modality == "infrared"))
        if filters.time_from is not None:
            parts.append(metas.times.view >= filters.time_from)
        if filters.time_to is not None:
            parts.append(metas.times.view <= filters.time_to)
        mask = parts[0].copy() if parts[0] is alive else parts[0]
        for part in parts[1:]:
            mask &= part
        return mask

    def _exact(self, q: np.ndarray, k: int,
               mask: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        if mask is not None and len(q) >= _SUBSET_BLAS_MIN_QUERIES:
            return self._exact_subset(q, k, np.flatnonzero(mask))
        if mask is None:
            gpu = self._gpu if self._approx is None and k <= _GPU_MAX_K else None
            scores, rows = (gpu if gpu is not None else self._flat).search(q, k)
        else:
            sel, _bits = _bitmap_selector(mask)
            # SWIG constructors take their fields as keywords that the stubs do not list
            scores, rows = self._flat.search(q, k, params=faiss.SearchParameters(sel=sel))  # pyright: ignore[reportCallIssue]
        return [_sorted_hits(r[r >= 0], s[r >= 0], k) for r, s in zip(rows, scores, strict=True)]

    def _exact_subset(self, q: np.ndarray, k: int,
                      rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Exact top-k over selected rows with blocked BLAS (many queries, any selectivity)."""
        best_s = np.empty((len(q), 0), np.float32)
        best_r = np.empty((len(q), 0), np.int64)
        for start in range(0, len(rows), _SUBSET_BLOCK):
            block = rows[start : start + _SUBSET_BLOCK]
            cand_s = np.concatenate([best_s, q @ self._vectors(block).T], axis=1)
            cand_r = np.concatenate([best_r, np.broadcast_to(block, (len(q), len(block)))], 1)
            if cand_s.shape[1] > k:
                top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s = np.take_along_axis(cand_s, top, 1)
                cand_r = np.take_along_axis(cand_r, top, 1)
            best_s, best_r = cand_s, cand_r
        return [_sorted_hits(r, s, k) for r, s in zip(best_r, best_s, strict=True)]

    def _approximate(self, q: np.ndarray, k: int, mask: np.ndarray | None,
                     m: int) -> list[tuple[np.ndarray, np.ndarray]]:
        found = self._approx_topk(q, k, mask, m, self._knob)
        short = [i for i, (rows, _) in enumerate(found) if len(rows) < k]
        if short:  # the probed part of the index held too few matches: answer those exactly
            for i, hit in zip(short, self._exact(q[short], k, mask), strict=True):
                found[i] = hit
        return found

    def _approx_topk(self, q: np.ndarray, k: int, mask: np.ndarray | None, m: int,
                     knob: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Approximate candidates (``_RERANK`` per wanted hit) rescored with exact cosines
        (from the SQ8 codes when compressed: exact to ~1e-3)."""
        k2 = min(m, k * (_COMPRESSED_RERANK if self._parts else _RERANK))
        if mask is None and self._gpu is not None and k2 <= _GPU_MAX_K:
            _, rows = self._gpu.search(q, k2)
        else:
            params, _bits = self._approx_params(mask, m, knob, k2)
            assert self._approx is not None  # only searched when there is one
            _, rows = self._approx.search(q, k2, params=params)
        out = []
        for qi, r in zip(q, rows, strict=True):
            r = r[r >= 0]
            out.append(_sorted_hits(r, self._scores(qi, r), k))
        return out

    def _scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosines of one query with ``rows``. SQ8 decodes affinely (x = lo + (c + 1/2) step),
        so q.x = q.lo + (c + 1/2).(q * step): one uint8 matrix-vector product, no decoded copy
        (faiss's sa_decode took 1-6 ms for 3,200 rows here, this ~1 ms)."""
        if not self._sq8:
            return self._xb()[rows] @ q
        lo, step = self._sq_affine
        w = q * step
        # einsum reads the uint8 rows directly (no float copy) and keeps BLAS's spinning
        # threads away from faiss's: with a BLAS product each search took ~2 ms longer
        dots = np.einsum("ij,j->i", self._codes()[rows], w)
        return dots + np.float32(q @ lo + 0.5 * w.sum())

    def _approx_params(self, mask: np.ndarray | None, m: int, knob: int,
                       k2: int) -> tuple[faiss.SearchParameters, np.ndarray | None]:
        if self._approx_kind in ("ivf", "compressed"):
            nlist = self._nlist()
            # a filter keeping a fraction f of rows needs ~1/f more lists for the same matches
            # on float IVF; the compressed index rescores 32 candidates a hit, which already
            # covers them (1M x 512, 12 % kept: recall 0.982 unwidened, 0.998 at 2.7x the time)
            nprobe = knob
            if mask is not None and self._approx_kind == "ivf":
                nprobe = math.ceil(knob * len(mask) / m)
            params = faiss.SearchParametersIVF(nprobe=min(nlist, nprobe))  # pyright: ignore[reportCallIssue]
        else:  # the graph walk also visits filtered-out nodes: widen the beam to match
            ef = max(knob, k2) if mask is None else math.ceil(max(knob, k2) * len(mask) / m)
            params = faiss.SearchParametersHNSW(efSearch=min(ef, _HNSW_MAX_EF))  # pyright: ignore[reportAttributeAccessIssue]
        bits = None
        if mask is not None:
            params.sel, bits = _bitmap_selector(mask)
        return params, bits

    # -- snapshots -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Full state (vectors, ids, metas, offsets, config, trained index) as one snapshot."""
        with self._lock.read():
            return b"".join(self._snapshot_chunks())  # join copies each chunk once

    def save(self, path: Path | str) -> None:
        """Write a snapshot atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh, self._lock.read():
                for chunk in self._snapshot_chunks():
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path | str, *, use_gpu: bool | None = None) -> PrefilterStore:
        return cls.from_bytes(Path(path).read_bytes(), use_gpu=use_gpu)

    def _snapshot_chunks(self) -> list[bytes | memoryview]:
        """Magic, header length, JSON header, sections, then sha256 of all of those.

        The vectors chunk views faiss memory: hold the read lock until the chunks are consumed.
        """
        sections, part_sizes = self._snapshot_sections()
        header = {
            "format": "chatreid.prefilter", "version": FORMAT_VERSION, "dim": self.dim,
            "exact_max": self.exact_max, "index_kind": self.index_kind,
            "target_recall": self.target_recall, "approx_kind": self.active_kind,
            "knob": self._knob, "trained_rows": self._trained_rows,
            "calibrated_rows": self._calibrated_rows,
            "rows": self._flat.ntotal, "offsets": _checked_offsets(self.offsets),
            "vectors_in_approx": self._flat_in_graph,
            "vector_codec": "sq8" if self._sq8 else "float32",
            "approx_parts": part_sizes, "partitions": self.partitions,
            "sections": [[name, len(data)] for name, data in sections],
        }
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        chunks = [_MAGIC, struct.pack("<I", len(raw)), raw, *(d for _, d in sections)]
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        return [*chunks, digest.digest()]

    def _snapshot_sections(self) -> tuple[list[tuple[str, memoryview]], list[int]]:
        if self._parts:  # faiss cannot serialise IndexShards: one blob per partition
            blobs = [faiss.serialize_index(part) for part in self._parts]
            approx = np.concatenate(blobs)
        else:
            blobs = []
            approx = (faiss.serialize_index(self._approx) if self._approx is not None
                      else np.empty(0, np.uint8))
        vectors = (faiss.serialize_index(self._flat) if self._sq8  # codes with their ranges
                   # HNSW serialises its storage, which holds the vectors: not written twice
                   else np.empty(0, "<f4") if self._flat_in_graph else self._xb())
        arrays = {
            "vectors": vectors,
            "ids": self._ids.view.astype("<i8", copy=False),
            "alive": self._alive.view.astype(np.uint8),
            "metas": np.frombuffer(self._metas.to_bytes(), np.uint8),
            "approx": approx,
        }
        # .data: the array's memoryview (numpy's hints lack __buffer__ before Python 3.12)
        return ([(name, np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8).data)
                 for name in _SECTIONS], [len(blob) for blob in blobs])

    @classmethod
    def from_bytes(cls, data: bytes, *, use_gpu: bool | None = None) -> PrefilterStore:
        """Rebuild a store from ``to_bytes`` output; corrupt or foreign data raises ValueError."""
        header, sections = _parse_snapshot(memoryview(data))
        try:
            return cls._from_parts(header, sections, use_gpu)
        except (KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise ValueError(f"prefilter snapshot is inconsistent: {exc}") from exc

    @classmethod
    def _from_parts(cls, header: dict[str, Any], sections: dict[str, memoryview],
                    use_gpu: bool | None) -> PrefilterStore:
        dim, n = int(header["dim"]), int(header["rows"])
        store = cls(dim, exact_max=int(header["exact_max"]), index_kind=header["index_kind"],
                    use_gpu=use_gpu, target_recall=float(header["target_recall"]))
        store.offsets = _checked_offsets(header["offsets"])
        ids = np.frombuffer(sections["ids"], "<i8")
        alive = np.frombuffer(sections["alive"], np.uint8).astype(np.bool_)
        metas = _read_metas(bytes(sections["metas"]), int(header["version"]))
        if not len(ids) == len(alive) == len(metas) == n:
            raise ValueError("prefilter snapshot sections disagree on the number of rows")
        if header["approx_kind"] != "flat":
            store._restore_approx(header, np.frombuffer(sections["approx"], np.uint8), n)
            store._knob, store._trained_rows = int(header["knob"]), int(header["trained_rows"])
            store._calibrated_rows = int(header["calibrated_rows"])
        if header.get("vector_codec", "float32") == "sq8":
            store._restore_codes(np.frombuffer(sections["vectors"], np.uint8), n)
        else:
            store._restore_vectors(np.frombuffer(sections["vectors"], "<f4"), n,
                                   bool(header["vectors_in_approx"]))
        store._restore_rows(ids, alive, metas)
        store._sync_gpu()
        return store

    def _restore_approx(self, header: dict[str, Any], blob: np.ndarray, n: int) -> None:
        sizes = [int(size) for size in header.get("approx_parts", [])]
        if header["approx_kind"] == "compressed":
            if not sizes or sum(sizes) != len(blob):
                raise ValueError("prefilter snapshot partitions do not match their sizes")
            bounds = np.cumsum([0, *sizes])
            self._parts = [faiss.deserialize_index(blob[a:b].copy())
                           for a, b in itertools.pairwise(bounds)]
            approx = faiss.IndexShards(self.dim, True, False)  # pyright: ignore[reportCallIssue]
            for part in self._parts:
                approx.add_shard(part)
            self.partitions = len(self._parts)
        else:
            approx = faiss.deserialize_index(blob.copy())
        if approx.ntotal != n or approx.d != self.dim:
            raise ValueError("prefilter snapshot approximate index does not match its rows")
        self._approx, self._approx_kind = approx, header["approx_kind"]

    def _restore_codes(self, blob: np.ndarray, n: int) -> None:
        flat = faiss.deserialize_index(blob.copy())
        if not isinstance(flat, faiss.IndexScalarQuantizer) or flat.ntotal != n \
                or flat.d != self.dim:
            raise ValueError("prefilter snapshot SQ8 vectors do not match its rows")
        self._use_codes(flat)

    def _restore_vectors(self, vectors: np.ndarray, n: int, in_approx: bool) -> None:
        if in_approx:
            if self._approx is None or self._approx_kind != "hnsw" or len(vectors):
                raise ValueError("prefilter snapshot keeps its vectors in a missing HNSW index")
            self._flat = faiss.downcast_index(self._approx.storage)  # pyright: ignore[reportAttributeAccessIssue]
            self._flat_in_graph = True
        elif len(vectors) != n * self.dim:
            raise ValueError("prefilter snapshot sections disagree on the number of rows")
        else:
            self._flat.add(np.ascontiguousarray(vectors.reshape(n, self.dim), np.float32))

    def _restore_rows(self, ids: np.ndarray, alive: np.ndarray, metas: MetaTable) -> None:
        self._ids, self._alive = Column(np.int64, ids), Column(np.bool_, alive)
        self._metas = metas
        live = np.flatnonzero(alive)
        self._row_of = {int(ids[r]): int(r) for r in live}
        if len(self._row_of) != len(live):
            raise ValueError("prefilter snapshot repeats a live id")
        self._n_dead = len(alive) - len(live)


# -- module helpers --------------------------------------------------------------------------


def _resolve_gpu(use_gpu: bool | None) -> bool:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    can = gpus > 0 and hasattr(faiss, "index_cpu_to_all_gpus")
    if use_gpu and not can:
        raise ValueError("use_gpu=True but faiss sees no GPU (install the faiss-gpu extra)")
    return can if use_gpu is None else bool(use_gpu)


def _read_metas(data: bytes, version: int) -> MetaTable:
    """Version 1 snapshots hold metadata as JSON rows, version 2 as columns."""
    table = MetaTable()
    if version == 1:
        metas = [VectorMeta(*row) for row in json.loads(data)]
        _check_metas(metas)
        table.extend(metas)
        return table
    return MetaTable.from_bytes(data)


def _checked_offsets(offsets: Any) -> dict[str, int]:
    if not isinstance(offsets, dict) or not all(
            isinstance(key, str) and isinstance(v, int) and not isinstance(v, bool)
            for key, v in offsets.items()):
        raise ValueError("offsets must map str keys to int offsets")
    return dict(offsets)


def _parse_snapshot(data: memoryview) -> tuple[dict[str, Any], dict[str, memoryview]]:
    fixed = len(_MAGIC) + 4
    if len(data) < fixed + _DIGEST_LEN or bytes(data[: len(_MAGIC)]) != _MAGIC:
        raise ValueError("not a prefilter store snapshot (bad magic or too short)")
    if hashlib.sha256(data[:-_DIGEST_LEN]).digest() != bytes(data[-_DIGEST_LEN:]):
        raise ValueError("prefilter snapshot checksum mismatch: the data is corrupt or truncated")
    (header_len,) = struct.unpack("<I", data[len(_MAGIC) : fixed])
    try:
        header = json.loads(bytes(data[fixed : fixed + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"prefilter snapshot header is not valid JSON: {exc}") from exc
    if header.get("format") != "chatreid.prefilter":
        raise ValueError("not a prefilter store snapshot (unknown format)")
    if header.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"prefilter snapshot format version {header.get('version')} is not "
                         f"supported (this build reads version {FORMAT_VERSION})")
    sections: dict[str, memoryview] = {}
    pos = fixed + header_len
    for name, length in header["sections"]:
        sections[name] = data[pos : pos + length]
        pos += length
    if pos != len(data) - _DIGEST_LEN or set(sections) != set(_SECTIONS):
        raise ValueError("prefilter snapshot sections do not match its header")
    return header, sections


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
