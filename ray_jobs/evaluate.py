"""``chatreid eval`` on a suite: baseline and ChatReID per task, the dialogues sharded over Ray
actors (each holds one VLM), resumable, with progress; then the report.

Resumable: every finished dialogue (its order, VLM calls and per-candidate confidences) is
appended to ``<out>/dialogues/<model version>.jsonl`` keyed by a hash of its inputs; a re-run
(after a crash, or with more tasks) reranks only what is not there yet. Rows written before
confidences were kept are re-run (their order followed the old confidence rule).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import ray
from tqdm import tqdm

from chatreid.config import Settings
from chatreid.data.datasets.base import DatasetLayoutError
from chatreid.evaluation.runner import (
    EvalConfig,
    RerankJob,
    RerankOutcome,
    TaskResult,
    evaluate_task,
    rerank_one,
)
from chatreid.evaluation.tasks import EvalTask
from chatreid.query import ModelSpec, VLMRuntime
from ray_jobs.placement import ClusterBusy, place_actors

__all__ = ["ClusterBusy", "RayReranker", "RerankActor", "run_evaluation"]


@ray.remote
class RerankActor:
    """One VLM. The constructor is cheap, so "placed" (it returned) and "loading the model"
    are told apart: a job can say it waits for CPUs, not hang on a model that never loads."""

    def __init__(self, settings: dict, spec: dict, threads: int) -> None:
        self.settings, self.spec, self.threads = settings, spec, threads
        self.runtime: VLMRuntime | None = None

    def placed(self) -> bool:
        return True

    def run(self, jobs: list[RerankJob]) -> list[RerankOutcome]:
        if self.runtime is None:
            import torch

            from chatreid.cluster import unshare

            torch.set_num_threads(self.threads)
            self.runtime = VLMRuntime.load(unshare(self.settings),
                                           ModelSpec.model_validate(self.spec))
        return [rerank_one(self.runtime, job) for job in jobs]


def job_hash(job: RerankJob) -> str:
    raw = json.dumps([job.kind, job.query_path, job.query_text, job.candidates])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class RayReranker:
    """Callable over jobs: cached outcomes first, the rest in shards over ``workers`` actors."""

    def __init__(self, settings: Settings, spec: ModelSpec, cache: Path, workers: int = 2,
                 threads: int = 1, shard_size: int = 8) -> None:
        self.settings, self.spec, self.workers = settings, spec, workers
        self.threads, self.shard_size = threads, shard_size
        self.cache = cache / f"{spec.version.replace('/', '_').replace(':', '_')}.jsonl"
        self.done: dict[str, dict] = {}
        if self.cache.exists():
            for line in self.cache.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if "confidences" in row:  # older rows: ranked by the old cap, re-run
                        self.done[row["hash"]] = row
        self._actors: list = []
        self.calls_run = 0  # VLM calls made in this process (not from the cache)

    def _pool(self) -> list:
        if not self._actors:
            from chatreid.cluster import share

            settings = share(self.settings, "eval")  # Ray keeps actor args: no secrets in them
            spec = self.spec.model_dump(mode="json")
            actors = [RerankActor.options(num_cpus=self.threads).remote(
                settings, spec, self.threads) for _ in range(self.workers)]
            self._actors = place_actors(actors, self.threads,
                                        self.settings.ray.placement_timeout_s, "VLM actors")
        return self._actors

    def __call__(self, jobs: Sequence[RerankJob]) -> list[RerankOutcome]:
        todo = [j for j in jobs if job_hash(j) not in self.done]
        if todo:
            self._run(todo)
        rows = [self.done[job_hash(j)] for j in jobs]
        return [RerankOutcome(j.key, tuple(row["order"]), row["calls"],
                              tuple(row["confidences"])) for j, row in zip(jobs, rows,
                                                                          strict=True)]

    def _run(self, todo: list[RerankJob]) -> None:
        actors = self._pool()
        shards = [todo[i:i + self.shard_size] for i in range(0, len(todo), self.shard_size)]
        pending = {}
        bar = tqdm(total=len(todo), desc="VLM dialogues", unit="query")
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with self.cache.open("a") as log:
            queue = list(shards)
            for actor in actors:
                if queue:
                    shard = queue.pop(0)
                    pending[actor.run.remote(shard)] = (actor, shard)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor, shard = pending.pop(ready[0])
                for job, outcome in zip(shard, ray.get(ready[0]), strict=True):
                    row = {"hash": job_hash(job), "order": list(outcome.order),
                           "calls": outcome.calls, "confidences": list(outcome.confidences)}
                    self.done[row["hash"]] = row
                    log.write(json.dumps(row) + "\n")
                    self.calls_run += outcome.calls
                log.flush()  # a crash loses at most the shards in flight
                bar.update(len(shard))
                if queue:
                    nxt = queue.pop(0)
                    pending[actor.run.remote(nxt)] = (actor, nxt)
        bar.close()

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def run_evaluation(settings: Settings, tasks: Sequence[EvalTask], root: Path, cfg: EvalConfig,
                   *, embedder, spec: ModelSpec | None, out: Path, workers: int = 2,
                   threads: int = 1) -> list[TaskResult]:
    """Every task's baseline, and ChatReID when ``spec`` names a VLM."""
    from chatreid.cluster import connect

    reranker = None
    if spec is not None:
        connect(settings)
        reranker = RayReranker(settings, spec, out / "dialogues", workers, threads)
    results = []
    try:
        for task in tasks:
            try:
                results.append(evaluate_task(task, root, embedder.embed, reranker, cfg))
            except DatasetLayoutError as exc:  # a dataset not on disk: the others still run
                results.append(_skipped(task, str(exc)))
    finally:
        if reranker is not None:
            reranker.close()
    return results


def _skipped(task: EvalTask, why: str) -> TaskResult:
    import numpy as np

    from chatreid.metrics import Metrics

    empty = Metrics(np.zeros(1), float("nan"), float("nan"), 0, 0)
    return TaskResult(task.name, task.task, task.protocol, empty, None, 0, 0, 0, [why])
