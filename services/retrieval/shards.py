"""The sharded prefilter tier on Serve: one ``PrefilterShard<i>`` deployment per shard, each
following its part of the indexed log (``chatreid.prefilter.shards``), and the clients the
``Prefilter`` deployment fans a query out through. With ``index.shards = 1`` none of this is
deployed: the Prefilter deployment holds the whole index itself, as before shards existed.

Each shard deployment writes its own snapshots (``<snapshot_prefix>/shard-i-of-N``): a
restarted shard restores its snapshot and replays only its partitions' gap.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from ray import serve

from chatreid.cluster import unshare
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.search import PrefilterSearch
from chatreid.prefilter.shards import Shard, ShardServer

log = logging.getLogger("chatreid.serve")

class IndexRefresher:
    """A replica's background thread that keeps its index following the log (and embedder
    rollouts), and what its health check and status report of it."""

    def __init__(self, search: PrefilterSearch, every_s: float) -> None:
        self.reader, self.every_s = search, every_s
        self.last_ok = time.monotonic()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-follow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.reader.refresh(timeout_s=60)
                self.last_ok, self.error = time.monotonic(), None
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("prefilter refresh failed; serving the current index")

    def status(self) -> dict:
        return {"last_refresh_s_ago": round(time.monotonic() - self.last_ok, 1),
                "refresh_error": self.error}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the index-follow thread stopped")
        stale = time.monotonic() - self.last_ok
        if self.error and stale > 300:
            raise RuntimeError(f"index not refreshed for {stale:.0f}s: {self.error}")

    def stop(self) -> None:
        self._stop.set()


@serve.deployment(name="PrefilterShard")  # bound once per shard as PrefilterShard<i>
class PrefilterShardDeployment(ShardServer):
    """One shard of the gallery index: the Prefilter deployment calls its
    :class:`~chatreid.prefilter.shards.ShardServer` methods (search, newest, ...) for every
    query, and ``refresh`` / ``purge`` / ``status`` for erasure, retention and status."""

    def __init__(self, settings: dict | None, index: int) -> None:
        self.settings = unshare(settings)
        if self.settings.index.partitions:  # Ray gives a sub-core replica one OMP thread
            import faiss

            faiss.omp_set_num_threads(self.settings.index.partitions)
        shard = Shard(index, self.settings.index.shards)
        # not ``self.search``: that is the ShardServer method the router calls
        self.reader = PrefilterSearch(self.settings, shard=shard, snapshots=True)
        self.reader.refresh()
        super().__init__(index, self.reader.index.active)
        self.refresher = IndexRefresher(self.reader, self.settings.serve.refresh_every_s)

    def refresh(self) -> int:
        """Apply the log up to now (erasure: before the router answers)."""
        return self.reader.refresh(timeout_s=60)

    def purge(self, cutoff: datetime) -> tuple[int, int]:
        """Retention: erase this shard's crops captured before ``cutoff``."""
        from chatreid.retention import Eraser

        store = self.active()[1]
        metas = store.live_metas() if store else []
        # the other shards' objects are not in these metas: no sweep of never-indexed ones
        crops, deleted = Eraser(self.settings, self.reader.objects).purge(cutoff, metas,
                                                                         orphans=False)
        self.reader.refresh(timeout_s=60)
        return crops, deleted

    def status(self) -> dict:
        index = self.reader.index
        assert isinstance(index, IndexFollower)  # a shard follows its part of the log
        return {"shard": self.shard, "gallery": self.reader.gallery_size(),
                "embedder_version": self.reader.version,
                "pending_embedder_version": self.reader.pending_version,
                **self.refresher.status(),
                "index_log": index.stats.log_summary()}

    def check_health(self) -> None:
        self.refresher.check_health()

    def __del__(self) -> None:
        self.refresher.stop()


class _Pending:
    def __init__(self, response) -> None:
        self.response = response

    def result(self, timeout: float | None = None) -> Any:
        return self.response.result(timeout_s=timeout)


class ServeShard:
    """A :class:`~chatreid.prefilter.shards.ShardClient` over a shard deployment's handle."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def call(self, method: str, *args: Any) -> _Pending:
        return _Pending(getattr(self.handle, method).remote(*args))
