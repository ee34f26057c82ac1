"""Move a running embedding service to each new embedder checkpoint, without dropping a crop.

Per checkpoint (``checkpoints`` topic, model ``embedder``), on every replica:

1. pull + verify + load (:class:`~chatreid.embedder.releases.CheckpointWatcher`); a refused
   checkpoint is dead-lettered and the replica keeps its embedder;
2. the rollout gate (:mod:`chatreid.evaluation.gate`): the release and the live embedder are
   scored on the same held-out people; a worse release (or an unreadable validation set) is
   refused - a ``refused`` ``DeploymentEvent`` with both figures - and the live embedder keeps
   serving. Every replica judges (the same data gives the same verdict), the reindexing one
   announces; a forced re-announcement (``chatreid force``) rolls regardless, audited;
3. dual-write: from the next batch, each crop is published under the live and the new version,
   so the live index stays complete and the new one receives every new crop;
4. rebuild: the replica that reindexes (the snapshot replica) re-embeds every crop of the live
   index under the new version (:class:`~.reindex.Reindexer`) and writes the rollout report;
   the others wait for that report;
5. retire the old version: single-write again. Readers switch on their own once the report
   exists and their copy of the new index covers the old one.
"""

from __future__ import annotations

import logging
import threading

from chatreid.bus import make_producer, publish
from chatreid.config import Settings
from chatreid.embedder.releases import CheckpointWatcher, Release
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.rollout import read_report
from chatreid.schemas import DEPLOYMENTS, DeploymentEvent

from .reindex import ReindexCancelled, Reindexer
from .service import EmbedderService

__all__ = ["Rollout"]

log = logging.getLogger(__name__)

_RETRY_S = 5.0


class Rollout:
    def __init__(self, settings: Settings, service: EmbedderService, watcher: CheckpointWatcher,
                 *, follower: IndexFollower | None = None, reindex: bool = True,
                 settle_s: float = 5.0, poll_s: float = 1.0) -> None:
        self.settings = settings
        self.service = service
        self.watcher = watcher
        self.follower = follower  # the replica's own index: built for the new version too
        self.reindex = reindex
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.completed: list[str] = []  # versions this replica rolled out, oldest first
        self.refused: list[str] = []  # versions the gate refused here
        self._busy = threading.Event()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def run(self, stop: threading.Event, pending: Release | None = None) -> None:
        """Thread body: roll out ``pending`` (found at start-up), then each newer checkpoint."""
        release = pending
        while not stop.is_set():
            if release is None:
                try:
                    release = self.watcher.newest(self.watcher.poll(int(self.poll_s * 1000)))
                except Exception:
                    log.exception("reading embedder checkpoints failed; retrying")
                    stop.wait(_RETRY_S)
                    continue
            if release is None or release.version == self.service.embedder.version:
                release = None
                continue
            try:
                self.migrate(release, stop)
                release = None
            except ReindexCancelled:
                return  # stopping: a restart resumes the rollout from the topic
            except Exception:
                log.exception("rollout of %s failed; still serving %s; retrying",
                              release.version, self.service.embedder.version)
                stop.wait(_RETRY_S)

    def migrate(self, release: Release, stop: threading.Event) -> None:
        old = self.service.embedder.version
        self._busy.set()
        try:
            verdict = self._judge(release)
            forced = release.event.forced is not None
            if verdict is not None and not verdict.passed and not forced:
                self.watcher.refused[release.event.manifest_sha256] = verdict.reason
                self.refused.append(release.version)
                log.error("rollout gate refused embedder %s: %s; still serving %s",
                          release.version, verdict.reason, old)
                self._announce("refused", release, old, verdict)
                return
            self._announce("started", release, old, verdict)
            log.info("rolling out embedder %s (serving %s)", release.version, old)
            _wait(self.service.begin_dual_write(release.embedder), stop)
            if self.follower is not None:
                self.follower.prepare(release.version)
            if self.reindex:
                Reindexer(self.settings, objects=self.watcher.objects,
                          settle_s=self.settle_s).run(old, release.embedder, release.source, stop)
            else:
                self._await_report(release.version, stop)
            _wait(self.service.retire(old), stop)
            self.completed.append(release.version)
            log.info("embedder %s rolled out; %s retired", release.version, old)
            self._announce("completed", release, old, verdict)
        finally:
            self._busy.clear()

    def _judge(self, release: Release):
        """The gate's verdict (None when the gate is off); an unreadable validation set is a
        refusal naming it."""
        from chatreid.evaluation.gate import GateError, Verdict, judge_embedder

        if not self.settings.gate.enabled:
            return None
        try:
            return judge_embedder(self.settings, release.embedder, self.service.embedder)
        except GateError as exc:
            return Verdict(False, {}, {}, str(exc))

    def _announce(self, status: str, release: Release, previous: str, verdict) -> None:
        """A ``DeploymentEvent`` from the replica that reindexes (one per rollout step)."""
        if not self.reindex:
            return
        forced = release.event.forced is not None and verdict is not None and not verdict.passed
        reason = verdict.reason if verdict is not None and (status == "refused" or forced) else None
        if forced:
            reason = f"forced by {release.event.forced.by}: {release.event.forced.reason}; {reason}"
        event = DeploymentEvent(
            model="embedder", status=status, version=release.version, previous_version=previous,
            reason=reason, candidate=verdict.candidate if verdict else {},
            serving=verdict.serving if verdict else {}, forced=forced)
        producer = make_producer(self.settings.kafka)
        try:
            publish(producer, self.settings.kafka.topic(DEPLOYMENTS.name), "embedder",
                    event).get(timeout=30)
        finally:
            producer.close()

    def _await_report(self, version: str, stop: threading.Event) -> None:
        """Replicas that do not reindex dual-write until the reindexing one reports."""
        while read_report(self.settings, self.watcher.objects, version) is None:
            if stop.wait(self.poll_s):
                raise ReindexCancelled(f"stopped while waiting for the rebuild of {version}")


def _wait(done: threading.Event, stop: threading.Event) -> None:
    """Wait for a service change to apply (between batches), unless stopping."""
    while not done.wait(0.2):
        if stop.is_set():
            raise ReindexCancelled("stopped before the service applied the change")
