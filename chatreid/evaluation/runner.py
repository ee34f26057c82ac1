"""The paper's evaluation protocol on one task: embedder baseline, then ChatReID.

Baseline: the prefilter's distances, scored under the task's protocol - the image embedder's
cosine distance for image queries, the colour-attribute matcher (``chatreid.embedder.colour``)
for text and attribute queries, their mean for multimodal (image + text) queries.
ChatReID: for each query, the gallery items within τ among the prefilter's top K are reranked
by the VLM's multi-turn best-choice dialogue; the final ranking is the reranked candidates by
response confidence, then every other item in the prefilter's order (stated in the report).
``EvalConfig.ranking = "fused"`` adds the fused mode (``chatreid.rerank.ranking``: the
dialogue's confidence blended with the prefilter's share, weight ``w``). With no
``fused_weight`` given, each trial's queries are split in half deterministically
(``split_queries``): ``w`` is fitted on the validation half only, and *every* row - prefilter,
peer, ChatReID by confidence, ChatReID fused - is scored on the test half, so the rows compare.
Peer: k-reciprocal re-ranking (Zhong et al. 2017; k1 = 20, k2 = 6, lambda = 0.3) over the same
prefilter features, for image-only queries, in runs that rerank.
The reranking itself is a callable (``Reranker``) so it can run in-process or sharded over Ray
actors (``ray_jobs/evaluate.py``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from chatreid.config import ServeSettings
from chatreid.data.datasets import ImageRecord
from chatreid.embedder.colour import ColourAttributeMatcher
from chatreid.evaluation.queries import EvalQuery, build_queries
from chatreid.evaluation.ranking import (
    RankingRun,
    fit_fused_weight,
    ordered_distances,
    select_rows,
    split_queries,
)
from chatreid.evaluation.tasks import EvalTask
from chatreid.metrics import (
    Labels,
    Metrics,
    compute_distmat,
    k_reciprocal_distances,
    k_reciprocal_order,
    mean_metrics,
    rank_metrics,
)
from chatreid.metrics.protocols import sample_gallery
from chatreid.rerank.ranking import RANKING_MODES, RankingMode
from schemas.api import QueryKind

_SERVE = ServeSettings.model_fields  # the live shortlist's defaults, one place
PEER = {"k1": 20, "k2": 6, "lambda_value": 0.3}  # k-reciprocal settings (the paper's defaults)
PEER_MAX_ITEMS = 10_000  # queries + gallery: dense (N x N) float32 matrices, ~400 MB each here


@dataclass(frozen=True)
class EvalConfig:
    k: int = 10  # candidates the VLM reranks per query
    tau: float | None = None  # cosine threshold of the prefilter
    max_queries: int | None = None  # a seeded sample of queries (quick runs); None = all
    seed: int = 0
    ranking: RankingMode = "confidence"  # "fused": also the fused row (module doc)
    fused_weight: float | None = None  # fused mode's w; None: fitted on a validation half
    peer: bool = True  # the k-reciprocal row (image-only queries, runs that rerank)
    # the prefilter's order for image-only queries, as serve.shortlist_order: "k_reciprocal"
    # re-orders each query's cosine top ``pool`` (chatreid.metrics.k_reciprocal_order)
    shortlist_order: Literal["cosine", "k_reciprocal"] = "cosine"
    pool: int = _SERVE["k_reciprocal_pool"].default
    k1: int = _SERVE["k_reciprocal_k1"].default
    lambda_value: float = _SERVE["k_reciprocal_lambda"].default

    @classmethod
    def served(cls, serve: ServeSettings, **kwargs) -> EvalConfig:
        """The shortlist as ``serve`` orders it for live queries (``serve.shortlist_order``
        and its k-reciprocal settings): what a gate or report must judge the VLM over."""
        return cls(shortlist_order=serve.shortlist_order, pool=serve.k_reciprocal_pool,
                   k1=serve.k_reciprocal_k1, lambda_value=serve.k_reciprocal_lambda, **kwargs)

    def __post_init__(self) -> None:
        if self.ranking not in RANKING_MODES:
            raise ValueError(f"ranking must be one of {RANKING_MODES}, got {self.ranking!r}")
        if self.fused_weight is not None and not 0.0 <= self.fused_weight <= 1.0:
            raise ValueError(f"fused_weight must be in [0, 1], got {self.fused_weight!r}")


@dataclass(frozen=True)
class RerankJob:
    """One query's dialogue: its image (path) or text, and the candidates' image paths."""

    key: str  # stable id of (task, trial, draw, query)
    kind: str
    query_path: str | None
    query_text: str | None
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class RerankOutcome:
    key: str
    order: tuple[int, ...]  # candidate positions the dialogue ranked, best first
    calls: int  # VLM forward passes
    # one per candidate (job order): the dialogue's confidence, None where not reranked;
    # empty: not recorded (an outcome from before confidences were kept)
    confidences: tuple[float | None, ...] = ()

    def confidence_list(self, n: int) -> list[float | None]:
        """The confidences over ``n`` candidates; unrecorded ones read as None."""
        return list(self.confidences) if len(self.confidences) == n else [None] * n


Reranker = Callable[[Sequence[RerankJob]], list[RerankOutcome]]


@dataclass
class TaskResult:
    task: str
    family: str
    protocol: str
    baseline: Metrics
    chatreid: Metrics | None = None
    vlm_calls: int = 0
    queries: int = 0
    runs: int = 1  # trials x gallery draws averaged
    notes: list[str] = field(default_factory=list)
    fused: Metrics | None = None  # ChatReID in the fused ranking mode (EvalConfig.ranking)
    fused_weight: float | None = None  # its w (given, or fitted on the validation half)
    peer: Metrics | None = None  # k-reciprocal re-ranking of the same prefilter
    # the best any reranker of the shortlist can do: the query's person first (labels known)
    ceiling: Metrics | None = None


def labels(records: Sequence[ImageRecord]) -> Labels:
    clothes = [r.clothes_id for r in records]
    return Labels(np.array([r.pid for r in records]), np.array([r.camid for r in records]),
                  None if any(c is None for c in clothes) else np.array(clothes))


def evaluate_task(task: EvalTask, root: Path, embed: Callable[[list[Image.Image]], np.ndarray],
                  rerank: Reranker | None, cfg: EvalConfig,
                  text_prefilter: ColourAttributeMatcher | None = None) -> TaskResult:
    """Baseline and (with ``rerank``) ChatReID on ``task``. The prefilter is the image
    embedder for image queries, the colour-attribute matcher for text and attribute queries,
    and the mean of both distances for multimodal (image + text) queries. With ``rerank``, also
    the peer row (image-only queries) and, in the fused mode, the fused row (module doc)."""
    text_prefilter = text_prefilter or ColourAttributeMatcher()
    fit = rerank is not None and cfg.ranking == "fused" and cfg.fused_weight is None
    base_runs: list[Metrics] = []
    chat_runs: list[Metrics] = []
    peer_runs: list[Metrics] = []
    ceiling_runs: list[Metrics] = []
    ranking_runs: list[RankingRun] = []
    validation: list[list[int]] = []
    scored: list[list[int]] = []
    calls = queries = 0
    notes = _notes(task, cfg, rerank is not None)
    for t, trial in enumerate(task.trials or ({},)):
        ds = task.load(root, **trial)
        query = _sample(build_queries(task, ds, root, cfg.seed), cfg)
        ql = labels([q.record for q in query])
        val, rows = split_queries(len(query), cfg.seed) if fit else ([], list(range(len(query))))
        gallery = [r for r in ds.gallery if not task.indoor or r.camid in (0, 1)]
        g_images = _open(gallery)
        image_side = (embed(_open([q.record for q in query])), embed(g_images)) \
            if task.image_query else None
        text_side = (text_prefilter.embed_texts([_clue(q) for q in query]),
                     text_prefilter.embed_images(g_images)) if task.text_query else None
        g_labels = labels(gallery)
        draws = ([sample_gallery(g_labels, 1, seed) for seed in range(task.gallery_draws)]
                 if task.gallery_draws else [np.arange(len(gallery))])
        peer = rerank is not None and cfg.peer and not task.text_query
        for d, idx in enumerate(draws):
            sub = [gallery[i] for i in idx]
            dist = _prefilter_distances(image_side, text_side, idx, text_prefilter)
            if cfg.shortlist_order == "k_reciprocal" and image_side is not None \
                    and text_side is None:
                dist = k_reciprocal_shortlists(dist, image_side[0], image_side[1][idx],
                                               pool=cfg.pool, k1=cfg.k1,
                                               lambda_value=cfg.lambda_value)
            gl = labels(sub)
            qs = select_rows(ql, rows)
            base_runs.append(rank_metrics(dist[rows], qs, gl, task.protocol))
            if rerank is None:
                queries += len(rows)
                continue
            if peer and image_side is not None:
                if len(query) + len(idx) <= PEER_MAX_ITEMS:
                    kr = k_reciprocal_distances(image_side[0], image_side[1][idx], **PEER)
                    peer_runs.append(rank_metrics(kr[rows], qs, gl, task.protocol))
                elif not any(n.startswith("k-reciprocal peer skipped") for n in notes):
                    notes.append(f"k-reciprocal peer skipped: {len(query)} queries + "
                                 f"{len(idx)} gallery items exceed {PEER_MAX_ITEMS} (dense "
                                 "N x N matrices)")
            lists = [shortlist(row, cfg) for row in dist]
            ceiling_runs.append(rank_metrics(ordered_distances(
                dist[rows], [lists[i] for i in rows],
                [_persons_first(lists[i], ql.pids[i], gl.pids) for i in rows]), qs, gl,
                task.protocol))
            jobs = _jobs(task, f"{task.name}/t{t}/d{d}", lists, query, sub)
            by_key = {o.key: o for o in rerank(jobs)}
            outcomes = [by_key[j.key] for j in jobs]
            orders = [outcomes[i].order for i in rows]
            chat_runs.append(rank_metrics(
                ordered_distances(dist[rows], [lists[i] for i in rows], orders), qs, gl,
                task.protocol))
            ranking_runs.append(RankingRun(
                dist, lists, [o.confidence_list(len(c)) for o, c in zip(outcomes, lists,
                                                                        strict=True)],
                ql, gl, task.protocol))
            validation.append(val)
            scored.append(rows)
            calls += sum(outcomes[i].calls for i in rows)
            queries += len(rows)
    fused = weight = None
    if rerank is not None and cfg.ranking == "fused":
        if cfg.fused_weight is None:  # = fit here
            found = fit_fused_weight(ranking_runs, validation)
            weight = found.weight
            notes.append(
                "fused mode: score = w * confidence + (1 - w) * softmax(prefilter similarity / "
                f"0.05) over the shortlist; w = {weight:g} fitted on a validation half of the "
                f"queries ({sum(map(len, validation))} query runs, mAP {found.validation_mAP:.3f}"
                "); every row of this task (prefilter, peer, confidence, fused) is scored on "
                "the other, test half only (the validation half's dialogues ran to fit w and "
                "are not counted in queries or VLM calls)")
        else:
            weight = float(cfg.fused_weight)
            notes.append("fused mode: score = w * confidence + (1 - w) * softmax(prefilter "
                         f"similarity / 0.05) over the shortlist; w = {weight:g} given")
        fused = mean_metrics([_fused_metrics(run, rows, weight)
                              for run, rows in zip(ranking_runs, scored, strict=True)])
    return TaskResult(task.name, task.task, task.protocol, mean_metrics(base_runs),
                      mean_metrics(chat_runs) if chat_runs else None, calls, queries,
                      len(base_runs), notes, fused, weight,
                      mean_metrics(peer_runs) if peer_runs else None,
                      mean_metrics(ceiling_runs) if ceiling_runs else None)


def _persons_first(items: list[int], pid, gallery_pids: np.ndarray) -> tuple[int, ...]:
    """Shortlist positions with the query's person first, each part in prefilter order: the
    protocol then drops what it does not count (same camera, same clothes), so no reorder of
    the shortlist scores higher."""
    same = [bool(gallery_pids[g] == pid) for g in items]
    return tuple(sorted(range(len(items)), key=lambda j: not same[j]))


def _fused_metrics(run: RankingRun, rows: list[int], w: float) -> Metrics:
    dist = ordered_distances(run.dist[rows], [run.shortlists[i] for i in rows],
                             run.fused_orders(w, rows))
    return rank_metrics(dist, select_rows(run.query, rows), run.gallery, run.protocol)


def _prefilter_distances(image_side: tuple[np.ndarray, np.ndarray] | None,
                         text_side: tuple[np.ndarray, np.ndarray] | None, idx: np.ndarray,
                         text_prefilter: ColourAttributeMatcher) -> np.ndarray:
    parts = []
    if image_side is not None:
        parts.append(compute_distmat(image_side[0], image_side[1][idx]))
    if text_side is not None:
        parts.append(text_prefilter.distance(text_side[0], text_side[1][idx]))
    return functools.reduce(operator.add, parts) / len(parts)


def k_reciprocal_shortlists(dist: np.ndarray, q_feats: np.ndarray, g_feats: np.ndarray, *,
                            pool: int, k1: int, lambda_value: float) -> np.ndarray:
    """Each query's ``pool`` nearest re-ordered as a live query's shortlist is
    (``serve.shortlist_order = "k_reciprocal"``): they take distances 0..1 in their new order,
    the rest follow in their old order (2 + their distance). Ranks only: the values say
    nothing more."""
    out = 2.0 + dist
    for i, row in enumerate(dist):
        top = np.argsort(row, kind="stable")[:pool]
        order = top[k_reciprocal_order(q_feats[i], g_feats[top], k1=k1,
                                       lambda_value=lambda_value)]
        out[i, order] = np.linspace(0.0, 1.0, len(order), dtype=np.float32)
    return out


def _clue(query: EvalQuery) -> str | Mapping[str, str]:
    """What the text prefilter parses: every query of a text task carries one."""
    if query.clue is None:
        raise ValueError(f"query {query.record.path} of a text task has no clue")
    return query.clue


def _notes(task: EvalTask, cfg: EvalConfig, reranked: bool = True) -> list[str]:
    notes = [f"top {cfg.k} reranked" + (f" within similarity ≥ {cfg.tau}" if cfg.tau else "")
             + "; the rest follow in the prefilter's order"]
    if reranked and cfg.peer and not task.text_query:
        notes.append("peer: k-reciprocal re-ranking (Zhong et al., CVPR 2017; k1 = 20, k2 = 6, "
                     "lambda = 0.3) of the same prefilter features, training-free")
    if cfg.shortlist_order == "k_reciprocal" and task.image_query and not task.text_query:
        notes.append(f"prefilter order: each query's cosine top {cfg.pool} re-ordered by "
                     f"k-reciprocal encoding among themselves (k1 = {cfg.k1}, lambda = "
                     f"{cfg.lambda_value}; serve.shortlist_order)")
    if task.text_query:
        how = "averaged with the image embedder's cosine distance" if task.image_query else ""
        notes.append(f"{task.kind} prefilter: colour-attribute matcher (upper/lower garment "
                     f"colour named by the clue vs the crop's colours) {how}".rstrip())
    return notes


def _sample(records: list[EvalQuery], cfg: EvalConfig) -> list[EvalQuery]:
    if cfg.max_queries is None or len(records) <= cfg.max_queries:
        return records
    rng = np.random.default_rng(cfg.seed)
    return [records[i] for i in sorted(rng.choice(len(records), cfg.max_queries, replace=False))]


def _open(records: Sequence[ImageRecord]) -> list[Image.Image]:
    return [Image.open(r.path).convert("RGB") for r in records]


def shortlist(dist_row: np.ndarray, cfg: EvalConfig) -> list[int]:
    """The prefilter's top K (similarity 1 - distance ≥ τ), best first."""
    order = np.argsort(dist_row, kind="stable")[: cfg.k]
    if cfg.tau is not None:
        order = order[(1.0 - dist_row[order]) >= cfg.tau]
    return order.tolist()


def _jobs(task: EvalTask, prefix: str, lists: Sequence[list[int]],
          query: Sequence[EvalQuery], gallery: Sequence[ImageRecord]) -> list[RerankJob]:
    return [RerankJob(f"{prefix}/q{i}", task.kind,
                      str(q.record.path) if task.image_query else None, q.text,
                      tuple(str(gallery[j].path) for j in lists[i]))
            for i, q in enumerate(query)]


def rerank_one(runtime, job: RerankJob) -> RerankOutcome:
    """One query's dialogue in this process (``runtime``: a loaded ``VLMRuntime``)."""
    from chatreid.rerank import Candidate, Query

    if not job.candidates:
        return RerankOutcome(job.key, (), 0)
    image = Image.open(job.query_path).convert("RGB") if job.query_path else None
    query = Query(QueryKind.parse(job.kind), image=image, text=job.query_text)
    cands = [Candidate(str(i), Image.open(p).convert("RGB")) for i, p in enumerate(job.candidates)]
    result = runtime.reranker.rerank(query, cands)
    order = tuple(int(r.candidate_id) for r in result.ranking if r.reranked)
    confidence = {int(r.candidate_id): r.confidence for r in result.ranking}
    return RerankOutcome(job.key, order, result.stats.forwards,
                         tuple(confidence[i] for i in range(len(cands))))


def in_process_reranker(runtime) -> Reranker:
    """A :data:`Reranker` that runs every dialogue here, one after the other."""
    return lambda jobs: [rerank_one(runtime, job) for job in jobs]
