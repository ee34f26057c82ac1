"""Move a running embedding service to each new embedder checkpoint, without dropping a crop.

Per checkpoint (``checkpoints`` topic, model ``embedder``), on every replica:

1. pull + verify + load (:class:`~chatreid.prefilter.releases.CheckpointWatcher`); a refused
   checkpoint is dead-lettered and the replica keeps its embedder;
2. the rollout gate (:mod:`chatreid.evaluation.gate`): the replica that reindexes scores the
   release and the live embedder on the same held-out people; a worse release (or an
   unreadable validation set, or one it cannot score) is refused - a ``refused``
   ``DeploymentEvent`` with both figures - and the live embedder keeps serving and indexing.
   Otherwise it announces ``started`` (and ``completed`` at the end). The other replicas follow
   that announced verdict (``deployments`` topic) instead of judging again: one verdict per
   checkpoint, so no replica ever dual-writes for a rebuild that will not happen (or waits for
   its report), and no replica stays behind on a rebuild that does (a later ``started`` of a
   version they were told to refuse rolls it after all; a later ``refused`` of one they
   dual-write for stops that). A forced re-announcement
   (``chatreid force``) rolls regardless, its figures still reported, audited;
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

from chatreid.bus import make_producer, publish, read_from_start
from chatreid.config import Settings
from chatreid.prefilter.follower import IndexFollower
from chatreid.prefilter.rebuild import read_report
from chatreid.prefilter.releases import CheckpointWatcher, Release
from schemas import DEPLOYMENTS, DeploymentEvent, EventError
from schemas.events import RolloutStatus
from services.embedder.reindex import ReindexCancelled, Reindexer
from services.embedder.service import EmbedderService

__all__ = ["Rollout"]

log = logging.getLogger(__name__)

_RETRY_S = 5.0
_WAITING_LOG_S = 60.0


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
        self._verdicts: _Verdicts | None = None  # the reindexing replica's, for the others
        self._held: dict[str, Release] = {}  # refused as told; rolled if it starts them later

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def run(self, stop: threading.Event, pending: Release | None = None) -> None:
        """Thread body: roll out ``pending`` (found at start-up), then each newer checkpoint."""
        try:
            self._follow(stop, pending)
        finally:
            self.close()

    def _follow(self, stop: threading.Event, pending: Release | None) -> None:
        release = pending
        while not stop.is_set():
            if release is None:
                release = self._resumed()
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
        follower = not self.reindex and self.settings.gate.enabled
        if follower:  # not busy meanwhile: this replica embeds as before until it is told
            refusal = self._follow_verdict(release, stop)
            if refusal is not None:
                self._refuse(release, old, refusal)
                self._held[release.version] = release
                return
        self._busy.set()
        try:
            verdict = None
            if not follower:
                verdict = self._judge(release)
                if verdict is not None and not verdict.passed and release.event.forced is None:
                    self._refuse(release, old, verdict.reason)
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
                withdrawn = self._await_report(release, stop, follower)
                if withdrawn is not None:  # the reindexing replica judged again: refused
                    _wait(self.service.retire(release.version), stop)
                    self._refuse(release, old, withdrawn)
                    self._held[release.version] = release
                    return
            _wait(self.service.retire(old), stop)
            self.completed.append(release.version)
            log.info("embedder %s rolled out; %s retired", release.version, old)
            self._announce("completed", release, old, verdict)
        finally:
            self._busy.clear()

    def _refuse(self, release: Release, old: str, reason: str) -> None:
        self.watcher.refused[release.event.manifest_sha256] = reason
        self.refused.append(release.version)
        log.error("rollout gate refused embedder %s: %s; still serving %s", release.version,
                  reason, old)

    def _judge(self, release: Release):
        """The gate's verdict (None when the gate is off); an unreadable validation set, or a
        candidate that fails on it, is a refusal naming the cause."""
        from chatreid.evaluation.gate import GateError, Verdict, judge_embedder

        if not self.settings.gate.enabled:
            return None
        try:
            return judge_embedder(self.settings, release.embedder, self.service.embedder)
        except GateError as exc:
            return Verdict(False, {}, {}, str(exc))
        except Exception as exc:  # the candidate cannot even be scored: it does not serve
            log.exception("the rollout gate could not score embedder %s", release.version)
            return Verdict(False, {}, {}, f"the rollout gate could not score it: "
                           f"{type(exc).__name__}: {exc}")

    def _follow_verdict(self, release: Release, stop: threading.Event) -> str | None:
        """Wait for the reindexing replica's verdict on ``release``: None when it rolls it
        (``started``), else the reason it refused it."""
        if self._verdicts is None:
            self._verdicts = _Verdicts(self.settings)
        forced = release.event.forced is not None
        waited = 0.0
        while True:
            found = self._verdicts.decision(release.version, forced=forced)
            if found is not None:
                log.info("the reindexing replica %s embedder %s", found.status, release.version)
                return None if found.status == "started" else (found.reason or "refused")
            if stop.wait(self.poll_s):
                raise ReindexCancelled(f"stopped while waiting for the verdict on "
                                       f"{release.version}")
            waited += self.poll_s
            if waited >= _WAITING_LOG_S:
                waited = 0.0
                log.info("waiting for the reindexing replica's verdict on embedder %s",
                         release.version)

    def close(self) -> None:
        if self._verdicts is not None:
            self._verdicts.close()
            self._verdicts = None

    def _announce(self, status: RolloutStatus, release: Release, previous: str, verdict) -> None:
        """A ``DeploymentEvent`` from the replica that reindexes (one per rollout step)."""
        if not self.reindex:
            return
        force = release.event.forced
        forced = force is not None and verdict is not None and not verdict.passed
        reason = verdict.reason if verdict is not None and (status == "refused" or forced) else None
        if force is not None and forced:
            reason = f"forced by {force.by}: {force.reason}; {reason}"
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

    def _await_report(self, release: Release, stop: threading.Event,
                      follower: bool) -> str | None:
        """Replicas that do not reindex dual-write until the reindexing one reports. With the
        gate on, a refusal it announces meanwhile (it restarted and judged again) ends the
        wait: returns its reason, and no report will come."""
        version, forced = release.version, release.event.forced is not None
        while read_report(self.settings, self.watcher.objects, version) is None:
            if follower and self._verdicts is not None:
                found = self._verdicts.decision(version, forced=forced)
                if found is not None and found.status == "refused":
                    return found.reason or "refused"
            if stop.wait(self.poll_s):
                raise ReindexCancelled(f"stopped while waiting for the rebuild of {version}")
        return None

    def _resumed(self) -> Release | None:
        """A release this replica refused as told that the reindexing replica has rolled out
        since (its latest step is ``started``: it judged again, e.g. after a restart)."""
        if not self._held or self._verdicts is None:
            return None
        for version, release in list(self._held.items()):
            found = self._verdicts.decision(version, forced=False)
            if found is not None and found.status == "started":
                del self._held[version]
                self.watcher.refused.pop(release.event.manifest_sha256, None)
                log.info("the reindexing replica now rolls embedder %s out; following", version)
                return release
        return None


class _Verdicts:
    """The embedder steps announced on ``deployments`` (read from its start, no group)."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka.topic(DEPLOYMENTS.name)
        self.consumer = read_from_start(settings.kafka, self.topic)
        self.steps: list[DeploymentEvent] = []

    def decision(self, version: str, *, forced: bool) -> DeploymentEvent | None:
        """The latest ``started`` or ``refused`` of ``version`` (for a forced release: its
        ``started``; the refusal before the override does not count)."""
        for records in self.consumer.poll(timeout_ms=200, max_records=500).values():
            for r in records:
                try:
                    event = DeploymentEvent.from_bytes(r.value)
                except EventError:
                    continue  # not a step this replica can follow
                if event.model == "embedder":
                    self.steps.append(event)
        wanted = ("started",) if forced else ("started", "refused")
        found = [e for e in self.steps if e.version == version and e.status in wanted]
        return found[-1] if found else None

    def close(self) -> None:
        self.consumer.close()


def _wait(done: threading.Event, stop: threading.Event) -> None:
    """Wait for a service change to apply (between batches), unless stopping."""
    while not done.wait(0.2):
        if stop.is_set():
            raise ReindexCancelled("stopped before the service applied the change")
