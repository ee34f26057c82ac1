"""A prefilter tier split into shards: which part of the gallery each shard holds, and the
fan-out that makes N shards answer like one index.

**The shard key is the indexed log's partition.** Shard ``i`` of ``N`` follows the partitions
``p`` of the ``indexed`` topic with ``p mod N = i``. Events are keyed by camera, so:

- a shard replays and snapshots only its partitions (it never reads the others' records);
- a crop's indexed event, its erasure and its re-embeddings land in the same partition, in
  order, so erasure and embedder rollouts work per shard by construction;
- one camera lives in one shard. With hundreds of cameras hashed over the partitions the
  shards stay even (the ``benchmarks/prefilter_shards.py`` cost model; ``docs/scale.md``).

Hashing crop ids would balance a site of few cameras better, but every shard would then read
every partition to find its crops (N times the replay), and erasures would need their own
routing. A time-window split makes the newest shard take every write and most queries.

**Fan-out.** :class:`ShardedStore` answers what the query path asks of a
:class:`~chatreid.prefilter.store.PrefilterStore` (top-k search, newest, similarity, colour
vectors, lookups) by asking every shard through a :class:`ShardClient` (a Serve handle, a Ray
actor, or an object in this process) and merging: the merged top-k is the top-k of the
shards' top-k lists, so a sharded search returns what one index of the same vectors would
(exact search; each approximate shard keeps its own recall). A shard that fails or does not
answer within the timeout fails the whole call with :class:`ShardUnavailable` (HTTP 503),
never a silently shorter list; a shard serving another embedder version than the query was
embedded with fails it with :class:`IndexSwitching` (503, retry in a second: shards switch
versions within a poll of each other at the end of a rollout).

Light: numpy and the store's dataclasses only; the Serve and Ray clients live with their
services (``services/retrieval/shards.py``, ``benchmarks/prefilter_shards.py``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from chatreid.errors import ServingError
from chatreid.prefilter.store import Hit, SearchFilter, VectorMeta

__all__ = [
    "IndexSwitching",
    "LocalShard",
    "Pending",
    "Shard",
    "ShardClient",
    "ShardInfo",
    "ShardUnavailable",
    "ShardedIndex",
    "ShardedStore",
    "shard_of_partition",
]


class ShardUnavailable(ServingError):
    """A prefilter shard did not answer (down, restarting, or slower than
    ``index.shard_timeout_s``): the answer would miss its part of the gallery, so none is
    given. Retry in a few seconds (Serve restarts a dead shard replica)."""

    status, code = 503, "prefilter.shard_unavailable"
    retry_after_s = 5.0


class IndexSwitching(ServingError):
    """The shards are switching to a new embedder version (the end of a rollout): for a
    moment some serve the new version and some the old, and a query embedded in one space is
    not searched in the other. Retry in a second."""

    status, code = 503, "prefilter.switching"
    retry_after_s = 1.0


def shard_of_partition(partition: int, shards: int) -> int:
    return partition % shards


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the partitions it follows and where its snapshots live."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    def owns(self, partition: int) -> bool:
        return shard_of_partition(partition, self.count) == self.index

    @property
    def folder(self) -> str:
        """Its snapshots' folder under ``index.snapshot_prefix``; "" for a single shard, which
        keeps an unsharded deployment's snapshots where they always were."""
        return "" if self.count == 1 else f"shard-{self.index}-of-{self.count}"

    @classmethod
    def all(cls, count: int) -> list[Shard]:
        return [cls(i, count) for i in range(count)]


@dataclass(frozen=True)
class ShardInfo:
    """What the fan-out needs to know of a shard between queries."""

    shard: int
    embedder_version: str | None
    size: int
    colour_dim: int


class Pending(Protocol):
    """A call under way (a ``concurrent.futures.Future``, a Serve response, ...)."""

    def result(self, timeout: float | None = None) -> Any: ...


class ShardClient(Protocol):
    """Calls one shard's method (of :class:`ShardServer`'s API) without waiting."""

    def call(self, method: str, *args: Any) -> Pending: ...


class ShardServer:
    """The shard side of the fan-out: answers for the live store of one shard's follower
    (anything with ``active() -> (version, store)``). The Serve shard deployment and the
    benchmark's actors expose these methods; :class:`ShardedStore` calls them."""

    def __init__(self, shard: int, active: Callable[[], tuple[str | None, Any]]) -> None:
        self.shard, self.active = shard, active

    def info(self) -> ShardInfo:
        version, store = self.active()
        return ShardInfo(self.shard, version, len(store) if store else 0,
                         store.colour_dim if store else 0)

    def _store(self, version: str | None):
        live, store = self.active()
        if version is not None and live is not None and live != version:
            raise IndexSwitching(f"prefilter shard {self.shard} serves embedder {live}, "
                                 f"not {version}; retry in a second")
        return store

    def search(self, version: str | None, queries: np.ndarray, k: int, tau: float | None,
               filters: SearchFilter | None) -> list[list[Hit]]:
        store = self._store(version)
        if store is None or len(store) == 0:
            return [[] for _ in range(np.atleast_2d(queries).shape[0])]
        return store.search(queries, k, tau=tau, filters=filters)

    def newest(self, k: int, filters: SearchFilter | None,
               exclude: frozenset[str]) -> list[VectorMeta]:
        store = self._store(None)
        return store.newest(k, filters, exclude) if store else []

    def similarity(self, version: str | None, query: np.ndarray,
                   crop_ids: Sequence[str]) -> np.ndarray:
        store = self._store(version)
        return (store.similarity(query, crop_ids) if store
                else np.full(len(crop_ids), np.nan, np.float32))

    def vectors(self, version: str | None, crop_ids: Sequence[str]) -> np.ndarray:
        store = self._store(version)
        return (store.vectors(crop_ids) if store
                else np.full((len(crop_ids), 0), np.nan, np.float32))

    def colours(self, crop_ids: Sequence[str], dim: int) -> np.ndarray:
        store = self._store(None)
        if store is None or store.colour_dim != dim:
            return np.full((len(crop_ids), dim), np.nan, np.float32)
        return store.colours(crop_ids)

    def get_meta(self, crop_id: str) -> VectorMeta | None:
        store = self._store(None)
        return store.get_meta(crop_id) if store else None

    def cameras(self) -> dict[str, dict]:
        store = self._store(None)
        return camera_summary(store.live_metas() if store else [])


def camera_summary(metas: Sequence[VectorMeta]) -> dict[str, dict]:
    """Per camera: crops, newest capture time, modalities (the console's camera list)."""
    seen: dict[str, dict] = {}
    for meta in metas:
        cam = seen.setdefault(meta.camera, {"camera": meta.camera, "crops": 0,
                                            "last_seen": 0.0, "modalities": set()})
        cam["crops"] += 1
        cam["last_seen"] = max(cam["last_seen"], meta.capture_time)
        cam["modalities"].add(meta.modality)
    return seen


def merge_cameras(parts: Sequence[dict[str, dict]]) -> list[dict]:
    """Shards' camera summaries as one list, by camera name."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, cam in part.items():
            into = merged.setdefault(name, {"camera": name, "crops": 0, "last_seen": 0.0,
                                            "modalities": set()})
            into["crops"] += cam["crops"]
            into["last_seen"] = max(into["last_seen"], cam["last_seen"])
            into["modalities"] |= cam["modalities"]
    return [{**c, "modalities": sorted(c["modalities"])} for _, c in sorted(merged.items())]


class LocalShard:
    """A shard in this process (tests, one-process tools): calls run at once."""

    def __init__(self, server: ShardServer) -> None:
        self.server = server

    def call(self, method: str, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(getattr(self.server, method)(*args))
        except BaseException as exc:  # delivered to the caller, as a remote call would
            future.set_exception(exc)
        return future


class ShardedStore:
    """The union of the shards' stores, read-only, for the embedder ``version`` the query is
    embedded with; the subset of :class:`PrefilterStore` the query path uses."""

    def __init__(self, clients: Sequence[ShardClient], infos: Sequence[ShardInfo],
                 version: str | None, timeout_s: float) -> None:
        self.clients, self.infos = list(clients), list(infos)
        self.version, self.timeout_s = version, timeout_s

    def __len__(self) -> int:
        return sum(i.size for i in self.infos)

    @property
    def colour_dim(self) -> int:
        return max((i.colour_dim for i in self.infos), default=0)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ask_all(self.clients, self.timeout_s, method, *args)

    def search(self, queries: np.ndarray, k: int, *, tau: float | None = None,
               filters: SearchFilter | None = None) -> list[list[Hit]]:
        """Per query, the best ``k`` of every shard's best ``k`` (ties by crop id)."""
        q = np.asarray(queries, np.float32)
        parts = self._all("search", self.version, q, k, tau, filters)
        return [merge_hits([part[i] for part in parts], k)
                for i in range(q.shape[0] if q.ndim == 2 else 1)]

    def newest(self, k: int, filters: SearchFilter | None = None,
               exclude: set[str] | frozenset[str] = frozenset()) -> list[VectorMeta]:
        parts = self._all("newest", k, filters, frozenset(exclude))
        merged = heapq.merge(*parts, key=lambda m: (-m.capture_time, m.crop_id))
        return list(merged)[:k]

    def similarity(self, query: np.ndarray, crop_ids: Sequence[str]) -> np.ndarray:
        parts = self._all("similarity", self.version, np.asarray(query, np.float32),
                          list(crop_ids))
        return _first_held(parts, (len(crop_ids),))

    def vectors(self, crop_ids: Sequence[str]) -> np.ndarray:
        parts = [p for p in self._all("vectors", self.version, list(crop_ids))
                 if np.asarray(p).shape[1]]  # a shard with no store knows no dim
        dim = np.asarray(parts[0]).shape[1] if parts else 0
        return _first_held(parts, (len(crop_ids), dim))

    def colours(self, crop_ids: Sequence[str]) -> np.ndarray:
        dim = self.colour_dim
        return _first_held(self._all("colours", list(crop_ids), dim), (len(crop_ids), dim))

    def get_meta(self, crop_id: str) -> VectorMeta | None:
        return next((m for m in self._all("get_meta", crop_id) if m is not None), None)

    def cameras(self) -> list[dict]:
        return merge_cameras(self._all("cameras"))


def ask_all(clients: Sequence[ShardClient], timeout_s: float, method: str,
            *args: Any) -> list[Any]:
    """Every shard's answer to ``method``, in shard order, all asked at once; the first
    failure fails the call."""
    futures = [c.call(method, *args) for c in clients]
    return [_result(i, len(clients), f, timeout_s) for i, f in enumerate(futures)]


def _result(shard: int, count: int, future: Pending, timeout_s: float) -> Any:
    try:
        return future.result(timeout=timeout_s)
    except ServingError:  # already says what to do (IndexSwitching, ...)
        raise
    except TimeoutError:
        raise ShardUnavailable(f"prefilter shard {shard} of {count} did not answer within "
                               f"{timeout_s:g} s") from None
    except Exception as exc:  # a dead actor, a lost node, a failed replica
        raise ShardUnavailable(f"prefilter shard {shard} of {count} is unavailable "
                               f"({type(exc).__name__})") from exc


def merge_hits(parts: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` hits of several shards' lists (each best first), ties by crop id."""
    return heapq.nsmallest(k, (h for part in parts for h in part),
                           key=lambda h: (-h.score, h.meta.crop_id))


def _first_held(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Row-wise, the shard that holds the crop (non-NaN); NaN where none does."""
    out = np.full(shape, np.nan, np.float32)
    for part in parts:
        part = np.asarray(part, np.float32)
        held = ~np.isnan(part) if part.ndim == 1 else ~np.isnan(part).any(axis=1)
        out[held] = part[held]
    return out


class ShardedIndex:
    """The router's view of the shards, in place of an :class:`IndexFollower`: ``active()``
    gives (live version, :class:`ShardedStore`). :meth:`catch_up` re-reads the shards' infos
    (the router's refresh thread calls it); each shard follows its own part of the log."""

    def __init__(self, clients: Sequence[ShardClient], timeout_s: float = 10.0) -> None:
        self.clients, self.timeout_s = list(clients), timeout_s
        self._active: tuple[str | None, ShardedStore | None] = (None, None)
        self._wanted: str | None = None
        self._seen = False  # whether every shard has answered once

    def active(self) -> tuple[str | None, ShardedStore | None]:
        if not self._seen:  # not "the gallery is empty": its parts have not answered yet
            raise ShardUnavailable(f"the {len(self.clients)} prefilter shards have not all "
                                   "answered yet (starting: restoring and replaying the log)")
        return self._active

    def each(self, method: str, *args: Any) -> list[Any]:
        """Every shard's answer to ``method`` (refresh, purge, status), in shard order."""
        return ask_all(self.clients, self.timeout_s, method, *args)

    @property
    def store(self) -> ShardedStore | None:
        return self._active[1]

    @property
    def shards(self) -> int:
        return len(self.clients)

    @property
    def pending_version(self) -> str | None:
        return self._wanted

    def prepare(self, version: str) -> None:
        """A new embedder is staged: the shards build its index themselves; remember it so
        the router keeps its embedder until they serve it."""
        if version != self._active[0]:
            self._wanted = version

    def restore(self) -> bool:
        self.catch_up()
        return self._active[1] is not None and len(self._active[1]) > 0

    def catch_up(self, timeout_s: float | None = None) -> int:
        """Re-read every shard's version and size; returns the gallery size. With shards on
        different versions (mid-switch) the most common one is live: queries reaching the
        others answer :class:`IndexSwitching` until they catch up."""
        infos: list[ShardInfo] = ask_all(self.clients, timeout_s or self.timeout_s, "info")
        self._seen = True
        versions = [i.embedder_version for i in infos if i.embedder_version is not None]
        live = max(sorted(set(versions)), key=versions.count) if versions else None
        if live is not None and live == self._wanted:
            self._wanted = None
        store = ShardedStore(self.clients, infos, live, self.timeout_s)
        self._active = (live, store)
        return len(store)
