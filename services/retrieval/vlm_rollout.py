"""Rolling redeploys of the VLM: follow checkpoint events, verify, roll replica by replica.

For each new VLM checkpoint of ``serve.stage`` on the ``checkpoints`` topic:

1. pull it and verify the manifest and every sha256, load it, and run the smoke query here,
   before any replica moves - a checkpoint failing any of that is ``refused``; then the
   rollout gate (:mod:`chatreid.evaluation.gate`): its reranking of the prefilter's shortlist
   on held-out people must not score below the prefilter alone, else ``refused`` with both
   figures (a forced re-announcement, ``chatreid force``, rolls regardless, audited);
2. ``started``: apply the deploy config with the new rerank ``user_config``; Serve calls each
   replica's ``reconfigure`` in place, one at a time, and every replica verifies, loads and
   smoke-checks the model itself before swapping it in, so the others keep answering;
3. ``completed`` once the application runs the new config; if a replica fails, the previous
   config is applied again and ``rolled_back`` says why.

Every step is a ``DeploymentEvent`` on the ``deployments`` topic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypedDict

from chatreid.bus import make_producer, publish, read_from_start
from chatreid.config import Settings
from chatreid.query import ModelSpec, VLMRuntime
from schemas import CHECKPOINTS, DEPLOYMENTS, CheckpointEvent, DeploymentEvent, EventError
from schemas.events import RolloutStatus
from services.retrieval.app import DeployFailed, deploy

log = logging.getLogger("chatreid.rollout")

Deployer = Callable[[Settings, ModelSpec | None], None]


class _Figures(TypedDict, total=False):
    """The gate's figures a rollout step reports (none when the gate is off)."""

    candidate: dict[str, float]
    serving: dict[str, float]


class VLMRollout:
    def __init__(self, settings: Settings, current: ModelSpec | None,
                 deployer: Deployer | None = None) -> None:
        self.settings = settings
        self.current = current
        self.deployer = deployer or (lambda s, spec: deploy(s, spec, wait=True))
        self.refused: dict[str, str] = {}  # manifest sha256 -> why
        self._consumer = None
        self._producer = None

    # -- the topic ---------------------------------------------------------------------------
    def _open(self):
        if self._consumer is None:
            topic = self.settings.kafka.topic(CHECKPOINTS.name)
            # every watcher sees everything
            self._consumer = read_from_start(self.settings.kafka, topic)
        return self._consumer

    def pending(self, timeout_ms: int = 1000) -> list[CheckpointEvent]:
        """VLM checkpoints of the served stage, newer than what serves now, oldest first."""
        polled = self._open().poll(timeout_ms=timeout_ms, max_records=100)
        found = []
        for record in sorted((r for b in polled.values() for r in b), key=lambda r: r.offset):
            try:
                event = CheckpointEvent.from_bytes(record.value)
            except EventError:
                continue  # not ours to judge: the embedder's watcher dead-letters bad events
            retry = event.manifest_sha256 not in self.refused or event.forced is not None
            if (event.model == "vlm" and event.stage == self.settings.serve.stage
                    and retry and self._newer(event)):
                found.append(event)
        return found

    def _newer(self, event: CheckpointEvent) -> bool:
        cur = self.current
        if cur is None or cur.event is None:  # serving a base model: any checkpoint is newer
            return True
        if event.forced is not None:  # an operator's override may also roll back
            return event.version != cur.version
        return event.version != cur.version and event.created_at > cur.event.created_at

    # -- rolling -----------------------------------------------------------------------------
    def step(self, timeout_ms: int = 1000) -> DeploymentEvent | None:
        """Roll the newest pending checkpoint, if any (older ones are superseded)."""
        events = self.pending(timeout_ms)
        return self.roll(events[-1]) if events else None

    def roll(self, event: CheckpointEvent) -> DeploymentEvent:
        spec, previous = ModelSpec.of_checkpoint(event), self.current
        try:
            runtime = VLMRuntime.load(self.settings, spec)
            runtime.smoke()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.refused[event.manifest_sha256] = reason
            log.error("refusing VLM checkpoint %s: %s", event.version, reason)
            return self._emit("refused", event.version, previous, reason)
        verdict = self._judge(runtime)
        del runtime  # the replicas load their own copy
        figures: _Figures = (
            {"candidate": verdict.candidate, "serving": verdict.serving} if verdict else {})
        force = event.forced
        forced = force is not None and verdict is not None and not verdict.passed
        if verdict is not None and not verdict.passed and not forced:
            self.refused[event.manifest_sha256] = verdict.reason
            log.error("rollout gate refused VLM checkpoint %s: %s", event.version,
                      verdict.reason)
            return self._emit("refused", event.version, previous, verdict.reason, **figures)
        reason = (f"forced by {force.by}: {force.reason}; {verdict.reason}"
                  if forced and force is not None and verdict is not None else None)
        self._emit("started", event.version, previous, reason, forced=forced, **figures)
        try:
            self.deployer(self.settings, spec)
        except DeployFailed as exc:
            log.error("rollout of %s failed (%s); restoring %s", event.version, exc,
                      previous.version if previous else "no model")
            self.deployer(self.settings, previous)
            self.refused[event.manifest_sha256] = str(exc)
            return self._emit("rolled_back", event.version, previous, str(exc))
        self.current = spec
        return self._emit("completed", event.version, previous, reason,
                          replicas=self._replicas(), forced=forced, **figures)

    def _judge(self, runtime):
        """The gate's verdict on a loaded runtime (None when the gate is off), against the
        prefilter embedder that serves now; an unreadable validation set, or a model the gate
        cannot score, is a refusal naming the cause."""
        from chatreid.evaluation.gate import GateError, Verdict, judge_vlm, serving_embedder

        if not self.settings.gate.enabled:
            return None
        try:
            return judge_vlm(self.settings, runtime, serving_embedder(self.settings))
        except GateError as exc:
            return Verdict(False, {}, {}, str(exc))
        except Exception as exc:  # refused, not crashed: the current model keeps serving
            log.exception("the rollout gate could not score the VLM checkpoint")
            return Verdict(False, {}, {}, f"the rollout gate could not score it: "
                           f"{type(exc).__name__}: {exc}")

    def run(self, stop: threading.Event, on_event: Callable[[DeploymentEvent], None] | None = None
            ) -> None:
        while not stop.is_set():
            event = self.step()
            if event is not None and on_event is not None:
                on_event(event)

    def _replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.settings.serve.app_name)
        rerank = app.deployments.get("Rerank") if app else None
        # keyed by Ray's private ReplicaState, a str enum: "RUNNING" is equal to its member
        return int(rerank.replica_states.get("RUNNING", 0)) if rerank else 0  # pyright: ignore[reportCallIssue, reportArgumentType]

    def _emit(self, status: RolloutStatus, version: str, previous: ModelSpec | None,
              reason: str | None = None, replicas: int = 0, forced: bool = False,
              candidate: dict[str, float] | None = None,
              serving: dict[str, float] | None = None) -> DeploymentEvent:
        event = DeploymentEvent(status=status, version=version, reason=reason,
                                previous_version=previous.version if previous else None,
                                replicas=replicas, forced=forced, candidate=candidate or {},
                                serving=serving or {})
        if self._producer is None:
            self._producer = make_producer(self.settings.kafka)
        topic = self.settings.kafka.topic(DEPLOYMENTS.name)
        publish(self._producer, topic, "vlm", event).get(timeout=30)
        log.info("VLM rollout %s: %s%s", status, version, f" ({reason})" if reason else "")
        return event

    def close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                client.close()
        self._consumer = self._producer = None
