"""The process ``chatreid embed`` runs: the service, its index follower and embedder rollouts."""

from __future__ import annotations

import logging
import signal
import threading

from chatreid.config import Settings
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.releases import CheckpointWatcher
from services.embedder.embedder_rollout import Rollout
from services.embedder.service import EmbedderService, Stats

__all__ = ["EmbeddingNode", "serve"]

log = logging.getLogger(__name__)


class EmbeddingNode:
    """One replica. With ``snapshots`` it also follows the indexed log (a local store for the
    skip-if-indexed fast path) and writes snapshots - one such replica per deployment, and
    only for an unsharded tier (``index.shards`` = 1) - and, by default, it is the replica
    that rebuilds the index when a new embedder is rolled out.

    The embedder comes from the ``checkpoints`` topic when it holds a rolled-out embedder
    checkpoint (``follow_checkpoints``), else from the settings (ImageNet or ``weights``).
    """

    def __init__(self, settings: Settings, *, snapshots: bool = True,
                 reindex: bool | None = None, follow_checkpoints: bool = True,
                 settle_s: float = 5.0) -> None:
        from chatreid.embedder import embedder_from_settings

        self.settings = settings
        self.watcher = CheckpointWatcher(settings) if follow_checkpoints else None

        def configured():
            return embedder_from_settings(settings.embedder)

        embedder, self._pending = (self.watcher.resolve(configured) if self.watcher
                                   else (configured(), None))
        # a sharded tier's shards snapshot their own parts; a whole-index copy here would
        # need the whole gallery's memory (the skip-if-indexed fast path goes with it)
        self.follower = (IndexFollower(settings, embedder_version=embedder.version,
                                       snapshots=True)
                         if snapshots and settings.index.shards == 1 else None)
        self.service = EmbedderService(settings, embedder, is_indexed=self._is_indexed,
                                       busy=lambda: self.rollout is not None and self.rollout.busy)
        self.rollout = (Rollout(settings, self.service, self.watcher, follower=self.follower,
                                reindex=snapshots if reindex is None else reindex,
                                settle_s=settle_s) if self.watcher else None)

    def _is_indexed(self, crop_id: str) -> bool:
        """Skip re-embedding a replayed crop only when the local index is the live version's."""
        if self.follower is None:
            return False
        version, store = self.follower.active()
        return version == self.service.embedder.version and store is not None and crop_id in store

    def run(self, until_idle_s: float | None = None) -> Stats:
        stop = threading.Event()
        threads: list[threading.Thread] = []
        if self.follower is not None:
            self.follower.restore()
            self.follower.catch_up()
            threads.append(threading.Thread(target=self.follower.follow, args=(stop,),
                                            name="index-follower", daemon=True))
        if self.rollout is not None:
            threads.append(threading.Thread(target=self.rollout.run, args=(stop, self._pending),
                                            name="embedder-rollout", daemon=True))
        for t in threads:
            t.start()
        try:
            return self.service.run(until_idle_s=until_idle_s)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            if self.follower is not None:
                self.follower.snapshot()
            if self.watcher is not None:
                self.watcher.close()

    def stop(self) -> None:
        """Finish the current batch and return from :meth:`run` (any thread, signal handlers)."""
        self.service.stop()


def serve(settings: Settings, until_idle_s: float | None = None, snapshots: bool = True,
          reindex: bool | None = None) -> Stats:
    """``chatreid embed``: one :class:`EmbeddingNode`; SIGTERM finishes the batch. ``reindex``
    (default: the snapshot replica) picks the replica that rebuilds the index on a rollout."""
    node = EmbeddingNode(settings, snapshots=snapshots, reindex=reindex)
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    return node.run(until_idle_s=until_idle_s)
