"""Embedding service: ``crops`` topic -> prefilter embedder -> ``indexed`` topic (the store's log)."""

from .service import EmbedderService, Stats

__all__ = ["EmbedderService", "Stats"]
