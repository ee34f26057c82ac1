"""Embedding service: ``crops`` -> prefilter embedder -> ``indexed`` (the store's log)."""

from .service import EmbedderService, Stats, serve

__all__ = ["EmbedderService", "Stats", "serve"]
