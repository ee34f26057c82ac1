"""Embedding service: ``crops`` -> prefilter embedder -> ``indexed`` (the store's log), and the
rollout of new embedder checkpoints (dual-write, background index rebuild, retire)."""

from .node import EmbeddingNode, serve
from .reindex import ReindexCancelled, Reindexer
from .rollout import Rollout
from .service import EmbedderService, Stats

__all__ = ["EmbedderService", "EmbeddingNode", "ReindexCancelled", "Reindexer", "Rollout",
           "Stats", "serve"]
