"""The paper's evaluation protocol on one task: embedder baseline, then ChatReID.

Baseline: the prefilter's distances, scored under the task's protocol - the image embedder's
cosine distance for image queries, the colour-attribute matcher (``chatreid.embedder.colour``)
for text and attribute queries, their mean for adaptive (image + text) queries.
ChatReID: for each query, the gallery items within τ among the prefilter's top K are reranked
by the VLM's multi-turn best-choice dialogue; the final ranking is the reranked candidates by
response confidence, then every other item in the prefilter's order (stated in the report).
The reranking itself is a callable (``Reranker``) so it can run in-process or sharded over Ray
actors (``ray_jobs/evaluate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from chatreid.data.datasets import ImageRecord
from chatreid.embedder.colour import ColourAttributeEmbedder
from chatreid.evaluation.queries import EvalQuery, build_queries
from chatreid.evaluation.tasks import EvalTask
from chatreid.metrics import Labels, Metrics, compute_distmat, mean_metrics, rank_metrics
from chatreid.metrics.protocols import sample_gallery


@dataclass(frozen=True)
class EvalConfig:
    k: int = 10  # candidates the VLM reranks per query
    tau: float | None = None  # cosine threshold of the prefilter
    max_queries: int | None = None  # a seeded sample of queries (quick runs); None = all
    seed: int = 0


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


def labels(records: Sequence[ImageRecord]) -> Labels:
    clothes = [r.clothes_id for r in records]
    return Labels(np.array([r.pid for r in records]), np.array([r.camid for r in records]),
                  None if any(c is None for c in clothes) else np.array(clothes))


def evaluate_task(task: EvalTask, root: Path, embed: Callable[[list[Image.Image]], np.ndarray],
                  rerank: Reranker | None, cfg: EvalConfig,
                  text_prefilter: ColourAttributeEmbedder | None = None) -> TaskResult:
    """Baseline and (with ``rerank``) ChatReID on ``task``. The prefilter is the image
    embedder for image queries, the colour-attribute matcher for text and attribute queries,
    and the mean of both distances for adaptive (image + text) queries."""
    text_prefilter = text_prefilter or ColourAttributeEmbedder()
    base_runs: list[Metrics] = []
    chat_runs: list[Metrics] = []
    calls = queries = 0
    for t, trial in enumerate(task.trials or ({},)):
        ds = task.load(root, **trial)
        query = _sample(build_queries(task, ds, root, cfg.seed), cfg)
        ql = labels([q.record for q in query])
        gallery = [r for r in ds.gallery if not task.indoor or r.camid in (0, 1)]
        g_images = _open(gallery)
        image_side = (embed(_open([q.record for q in query])), embed(g_images)) \
            if task.image_query else None
        text_side = (text_prefilter.embed_texts([q.clue for q in query]),
                     text_prefilter.embed_images(g_images)) if task.text_query else None
        g_labels = labels(gallery)
        draws = ([sample_gallery(g_labels, 1, seed) for seed in range(task.gallery_draws)]
                 if task.gallery_draws else [np.arange(len(gallery))])
        for d, idx in enumerate(draws):
            sub = [gallery[i] for i in idx]
            dist = _prefilter_distances(image_side, text_side, idx, text_prefilter)
            gl = labels(sub)
            base_runs.append(rank_metrics(dist, ql, gl, task.protocol))
            if rerank is not None:
                lists = [shortlist(row, cfg) for row in dist]
                jobs = _jobs(task, f"{task.name}/t{t}/d{d}", lists, query, sub)
                outcomes = rerank(jobs)
                chat_runs.append(rank_metrics(_reranked(dist, lists, jobs, outcomes), ql, gl,
                                              task.protocol))
                calls += sum(o.calls for o in outcomes)
            queries += len(query)
    return TaskResult(task.name, task.task, task.protocol, mean_metrics(base_runs),
                      mean_metrics(chat_runs) if chat_runs else None, calls, queries,
                      len(base_runs), _notes(task, cfg))


def _prefilter_distances(image_side: tuple[np.ndarray, np.ndarray] | None,
                         text_side: tuple[np.ndarray, np.ndarray] | None, idx: np.ndarray,
                         text_prefilter: ColourAttributeEmbedder) -> np.ndarray:
    parts = []
    if image_side is not None:
        parts.append(compute_distmat(image_side[0], image_side[1][idx]))
    if text_side is not None:
        parts.append(text_prefilter.distance(text_side[0], text_side[1][idx]))
    return sum(parts) / len(parts)


def _notes(task: EvalTask, cfg: EvalConfig) -> list[str]:
    notes = [f"top {cfg.k} reranked" + (f" within similarity ≥ {cfg.tau}" if cfg.tau else "")
             + "; the rest follow in the prefilter's order"]
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


def _reranked(dist: np.ndarray, lists: Sequence[list[int]], jobs: Sequence[RerankJob],
              outcomes: Sequence[RerankOutcome]) -> np.ndarray:
    """Distances that order each row as ChatReID ranks it: the dialogue's picks first (by
    confidence), then everything else in the embedder's order."""
    by_key = {o.key: o for o in outcomes}
    out = dist.astype(np.float64) + 10.0
    for i, (job, cands) in enumerate(zip(jobs, lists, strict=True)):
        for position, c in enumerate(by_key[job.key].order):
            out[i, cands[c]] = position * 1e-3
    return out


def rerank_one(runtime, job: RerankJob) -> RerankOutcome:
    """One query's dialogue in this process (``runtime``: a loaded ``VLMRuntime``)."""
    from chatreid.rerank import Candidate, Query

    if not job.candidates:
        return RerankOutcome(job.key, (), 0)
    image = Image.open(job.query_path).convert("RGB") if job.query_path else None
    query = Query(job.kind, image=image, text=job.query_text)
    cands = [Candidate(str(i), Image.open(p).convert("RGB")) for i, p in enumerate(job.candidates)]
    result = runtime.reranker.rerank(query, cands)
    order = tuple(int(r.candidate_id) for r in result.ranking if r.reranked)
    return RerankOutcome(job.key, order, result.stats.forwards)


def in_process_reranker(runtime) -> Reranker:
    """A :data:`Reranker` that runs every dialogue here, one after the other."""
    return lambda jobs: [rerank_one(runtime, job) for job in jobs]
