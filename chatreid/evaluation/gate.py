"""The rollout gate: no checkpoint serves before it proves itself on held-out people.

Validation parts (``settings.gate``): held-out synthetic people (the world's query/gallery
split, ``synth_standard``) and, when configured, real validation people (``cuhk03_pair1``: A -> B
and B -> A). Each part is a seeded sample of at most ``max_queries`` queries; the gate's figure
``gate/mAP`` is the mean over the parts (each part's own figures are kept too).

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
from dataclasses import dataclass, field
from pathlib import Path

from chatreid.config import Settings
from chatreid.data.datasets.base import DatasetLayoutError
from chatreid.evaluation.engine import EvalConfig, Reranker, evaluate_task, in_process_reranker
from chatreid.evaluation.tasks import BENCHMARKS, SYNTHETIC, EvalTask

__all__ = ["GateError", "Verdict", "judge_embedder", "judge_vlm", "validation_metrics"]

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


def _parts(settings: Settings) -> list[tuple[str, EvalTask, Path]]:
    cfg = settings.gate
    parts = []
    if cfg.synthetic:
        root = Path(cfg.synthetic_root or settings.train.world)
        parts.append(("synthetic", SYNTHETIC["synth_standard"], root))
    if cfg.real_root is not None:
        parts.append(("real", BENCHMARKS["cuhk03_pair1"], Path(cfg.real_root)))
    if not parts:
        raise GateError("the gate has no validation set: gate.synthetic is off and "
                        "gate.real_root is not set")
    return parts


def _score(name: str, task: EvalTask, root: Path, embed, rerank: Reranker | None,
           cfg: EvalConfig):
    try:
        return evaluate_task(task, root, embed, rerank, cfg)
    except (DatasetLayoutError, OSError) as exc:
        raise GateError(f"the {name} validation set {root} cannot be read: {exc}") from exc


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
    cfg = EvalConfig(max_queries=settings.gate.max_queries)
    per_part = {}
    for name, task, root in _parts(settings):
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


def judge_vlm(settings: Settings, runtime, embedder) -> Verdict:
    """Refuse a VLM whose reranking of the prefilter's shortlist scores below the prefilter
    alone, on ``vlm_queries`` held-out synthetic queries (top ``vlm_k`` reranked)."""
    gate = settings.gate
    root = Path(gate.synthetic_root or settings.train.world)
    cfg = EvalConfig(k=gate.vlm_k, max_queries=gate.vlm_queries)
    result = _score("synthetic", SYNTHETIC["synth_standard"], root, embedder.embed,
                    in_process_reranker(runtime), cfg)
    reranked = _summary({"synthetic": (float(result.chatreid.mAP), result.chatreid.rank(1))})
    prefilter = _summary({"synthetic": (float(result.baseline.mAP), result.baseline.rank(1))})
    if reranked["gate/mAP"] < prefilter["gate/mAP"]:
        reason = (f"reranked mAP {reranked['gate/mAP']:.4f} is below the prefilter alone "
                  f"({prefilter['gate/mAP']:.4f}) on {result.queries} held-out queries")
        return Verdict(False, reranked, prefilter, reason)
    return Verdict(True, reranked, prefilter, f"reranked mAP {reranked['gate/mAP']:.4f} >= "
                   f"prefilter {prefilter['gate/mAP']:.4f}")
