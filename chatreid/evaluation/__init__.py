"""Evaluation: benchmark tasks, the paper's inference protocol, and the report.

- ``tasks``: the ten benchmarks and the synthetic suite (reader, protocol, query kind, trials);
- ``engine``: embedder baseline and ChatReID (prefilter τ/K, best-choice rerank) on a task;
- ``report``: JSON, markdown tables laid out like the paper's, CMC plots.
The Ray job that shards the dialogues is ``ray_jobs/evaluate.py``.
"""

from chatreid.evaluation.runner import EvalConfig, RerankJob, RerankOutcome, TaskResult
from chatreid.evaluation.tasks import BENCHMARKS, SYNTHETIC, EvalTask

__all__ = ["BENCHMARKS", "SYNTHETIC", "EvalConfig", "EvalTask", "RerankJob", "RerankOutcome",
           "TaskResult"]
