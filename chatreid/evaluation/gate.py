"""The rollout gate: no checkpoint serves before it proves itself on held-out people.

Validation parts (``settings.gate``): held-out synthetic people (the world's query/gallery
split, ``synth_standard``) and, when configured, real validation people (``cuhk03_pair1``: A -> B
and B -> A). Each part is capped to ``max_people`` held-out people (a seeded choice among those
with both a query and a gallery image: their queries and their gallery images; always the same
people for the same data), and the gate's figures ``gate/mAP`` and ``gate/rank1`` are the means
over the parts (each part's own figures are kept too: ``gate/synthetic_mAP``, ``gate/real_mAP``).

* An **embedder** is refused when its ``gate/mAP`` is below the serving embedder's minus
  ``tolerance`` (both measured here, on the same queries).
* A **VLM** is refused when its reranked ``gate/mAP`` (the prefilter's top ``vlm_k`` reranked
  by its dialogue, on ``vlm_queries`` synthetic queries) is below the prefilter alone: a
  reranker must not make answers worse.

A validation set that cannot be read is a :class:`GateError` naming the path and the cause;
the callers refuse the rollout with it (an operator may force one, audited).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from chatreid.config import Settings
from chatreid.data.datasets.base import DatasetLayoutError, ImageDataset
from chatreid.evaluation.runner import EvalConfig, Reranker, evaluate_task, in_process_reranker
from chatreid.evaluation.tasks import BENCHMARKS, SYNTHETIC, EvalTask
from schemas import DeploymentEvent

__all__ = ["GateError", "HeldOut", "Verdict", "judge_embedder", "judge_vlm", "rollout_steps",
           "serving_embedder", "validation_metrics", "validation_parts", "vlm_validation_metrics"]

log = logging.getLogger(__name__)


class GateError(RuntimeError):
    """The validation set cannot be read; the message names it and why."""


@dataclass(frozen=True)
class Verdict:
    """The gate's answer with both sides' figures (``gate/mAP``, ``gate/rank1``, per part)."""

    passed: bool
    candidate: dict[str, float]
    serving: dict[str, float]
    reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HeldOut(EvalTask):
    """An evaluation task whose query and gallery are capped to ``max_people`` people: a seeded
    choice among the people with both a query and a gallery image (the same for every trial of
    the task, e.g. both directions of a camera pair)."""

    max_people: int | None = None
    seed: int = 0

    @classmethod
    def of(cls, task: EvalTask, max_people: int | None, seed: int = 0) -> HeldOut:
        return cls(**{f.name: getattr(task, f.name) for f in fields(EvalTask)},
                   max_people=max_people, seed=seed)

    def load(self, root, **extra) -> ImageDataset:
        ds = super().load(root, **extra)
        if self.max_people is None:
            return ds
        people = sorted({r.pid for r in ds.query} & {r.pid for r in ds.gallery})
        if not people:
            raise DatasetLayoutError(f"{self.name}: no person has both a query and a gallery "
                                     f"image under {root}")
        if len(people) > self.max_people:
            pick = np.random.default_rng(self.seed).choice(len(people), self.max_people,
                                                           replace=False)
            people = [people[i] for i in sorted(pick)]
        keep = set(people)
        ds.query = [r for r in ds.query if r.pid in keep]
        ds.gallery = [r for r in ds.gallery if r.pid in keep]
        return ds


def validation_parts(settings: Settings) -> list[tuple[str, EvalTask, Path]]:
    """(part name, task capped to ``gate.max_people``, root) for each configured part."""
    cfg = settings.gate
    parts = []
    if cfg.synthetic:
        root = Path(cfg.synthetic_root or settings.train.world)
        parts.append(("synthetic", HeldOut.of(SYNTHETIC["synth_standard"], cfg.max_people),
                      root))
    if cfg.real_root is not None:
        parts.append(("real", HeldOut.of(BENCHMARKS["cuhk03_pair1"], cfg.max_people),
                      Path(cfg.real_root)))
    if not parts:
        raise GateError("the gate has no validation set: gate.synthetic is off and "
                        "gate.real_root is not set")
    return parts


def _score(name: str, task: EvalTask, root: Path, embed, rerank: Reranker | None,
           cfg: EvalConfig):
    try:
        return evaluate_task(task, root, embed, rerank, cfg)
    except (DatasetLayoutError, OSError) as exc:  # OSError: unreadable files, undecodable images
        raise GateError(f"the {name} validation set {root} cannot be read: "
                        f"{type(exc).__name__}: {exc}") from exc


def _summary(per_part: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``gate/<part>_mAP``, ``gate/<part>_rank1`` and their means ``gate/mAP``, ``gate/rank1``."""
    out = {}
    for part, (m_ap, rank1) in per_part.items():
        out[f"gate/{part}_mAP"], out[f"gate/{part}_rank1"] = m_ap, rank1
    n = len(per_part)
    out["gate/mAP"] = sum(v[0] for v in per_part.values()) / n
    out["gate/rank1"] = sum(v[1] for v in per_part.values()) / n
    return out


def validation_metrics(settings: Settings, embedder) -> dict[str, float]:
    """An embedder's gate figures (what its manifest carries and the gate compares)."""
    cfg = EvalConfig()
    per_part = {}
    for name, task, root in validation_parts(settings):
        m = _score(name, task, root, embedder.embed, None, cfg).baseline
        per_part[name] = (float(m.mAP), m.rank(1))
    return _summary(per_part)


def judge_embedder(settings: Settings, candidate, serving) -> Verdict:
    """Refuse ``candidate`` when it validates worse than ``serving`` (minus the tolerance)."""
    new = validation_metrics(settings, candidate)
    old = validation_metrics(settings, serving)
    floor = old["gate/mAP"] - settings.gate.tolerance
    if new["gate/mAP"] < floor:
        reason = (f"validation mAP {new['gate/mAP']:.4f} is below the serving embedder "
                  f"{serving.version}'s {old['gate/mAP']:.4f}")
        return Verdict(False, new, old, reason)
    return Verdict(True, new, old, f"validation mAP {new['gate/mAP']:.4f} >= "
                   f"{old['gate/mAP']:.4f} (serving)")


def _vlm_figures(settings: Settings, runtime, embedder):
    """(reranked, prefilter alone, queries): the top ``vlm_k`` of ``vlm_queries`` held-out
    synthetic queries reranked by ``runtime``'s dialogue, in this process."""
    gate = settings.gate
    root = Path(gate.synthetic_root or settings.train.world)
    task = HeldOut.of(SYNTHETIC["synth_standard"], gate.max_people)
    # over the shortlist the VLM will be served (serve.shortlist_order)
    cfg = EvalConfig.served(settings.serve, k=gate.vlm_k, max_queries=gate.vlm_queries)
    result = _score("synthetic", task, root, embedder.embed, in_process_reranker(runtime), cfg)
    assert result.chatreid is not None  # scored with a reranker
    reranked = _summary({"synthetic": (float(result.chatreid.mAP), result.chatreid.rank(1))})
    prefilter = _summary({"synthetic": (float(result.baseline.mAP), result.baseline.rank(1))})
    return reranked, prefilter, result.queries


def judge_vlm(settings: Settings, runtime, embedder) -> Verdict:
    """Refuse a VLM whose reranking of the prefilter's shortlist scores below the prefilter
    alone, on ``vlm_queries`` held-out synthetic queries (top ``vlm_k`` reranked)."""
    reranked, prefilter, queries = _vlm_figures(settings, runtime, embedder)
    if reranked["gate/mAP"] < prefilter["gate/mAP"]:
        reason = (f"reranked mAP {reranked['gate/mAP']:.4f} is below the prefilter alone "
                  f"({prefilter['gate/mAP']:.4f}) on {queries} held-out queries")
        return Verdict(False, reranked, prefilter, reason)
    return Verdict(True, reranked, prefilter, f"reranked mAP {reranked['gate/mAP']:.4f} >= "
                   f"prefilter {prefilter['gate/mAP']:.4f}")


def vlm_validation_metrics(settings: Settings, runtime, embedder) -> dict[str, float]:
    """A VLM's gate figures for its manifest: ``gate/mAP``, ``gate/rank1`` (reranked) and
    ``gate/prefilter_mAP``, ``gate/prefilter_rank1`` (the prefilter alone, same queries)."""
    reranked, prefilter, _ = _vlm_figures(settings, runtime, embedder)
    return reranked | {"gate/prefilter_mAP": prefilter["gate/mAP"],
                       "gate/prefilter_rank1": prefilter["gate/rank1"]}


def serving_embedder(settings: Settings):
    """The prefilter embedder that serves now, as the embedding service resolves it: the newest
    embedder checkpoint whose index rebuild finished (never one the gate refused: those are
    never rebuilt), else the configured one."""
    from chatreid.embedder import embedder_from_settings
    from chatreid.prefilter.rebuild import read_report
    from chatreid.prefilter.releases import CheckpointWatcher

    watcher = CheckpointWatcher(settings, dead_letters=False)
    try:
        for sighted in reversed(watcher.catch_up()):
            if read_report(settings, watcher.objects, sighted.event.version) is not None:
                release = watcher.load(sighted)
                if release is not None:
                    return release.embedder
    finally:
        watcher.close()
    return embedder_from_settings(settings.embedder)


def rollout_steps(settings: Settings, kind: str,
                  timeout_s: float = 10.0) -> dict[str, DeploymentEvent]:
    """Each version's latest rollout step of model ``kind`` as announced on ``deployments``
    (a ``DeploymentEvent``: ``refused`` with the gate's figures, ``started``, ``completed``,
    ``rolled_back``), read from the topic's start to its end now."""
    import time

    from chatreid.bus import end_offsets, position, read_from_start
    from schemas import DEPLOYMENTS, EventError

    topic = settings.kafka.topic(DEPLOYMENTS.name)
    consumer = read_from_start(settings.kafka, topic)
    steps: dict[str, DeploymentEvent] = {}
    try:
        ends = end_offsets(consumer, consumer.assignment())
        deadline = time.monotonic() + timeout_s
        while any(position(consumer, tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout_s:g}s")
            for records in consumer.poll(timeout_ms=200, max_records=500).values():
                for r in records:
                    try:
                        event = DeploymentEvent.from_bytes(r.value)
                    except EventError:
                        continue  # not a step anyone can act on
                    if event.model == kind:
                        steps[event.version] = event
    finally:
        consumer.close()
    return steps
