"""Embedding service: ``crops`` -> prefilter embedder -> ``indexed`` (the store's log), and the
rollout of new embedder checkpoints (dual-write, background index rebuild, retire)."""

from services.embedder.embedder_rollout import Rollout
from services.embedder.node import EmbeddingNode, serve
from services.embedder.reindex import ReindexCancelled, Reindexer
from services.embedder.service import EmbedderService, Stats

__all__ = ["EmbedderService", "EmbeddingNode", "ReindexCancelled", "Reindexer", "Rollout",
           "Stats", "serve"]
