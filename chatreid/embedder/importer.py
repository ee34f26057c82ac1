"""``chatreid embedder import``: an ONNX Re-ID model becomes a versioned embedder checkpoint.

The model is opened, its card resolved (given, a convention, a sidecar, or inferred from the
graph) and held against the graph, run on the probe crops, then pushed like a trained embedder
(manifest + sha256 of every file + a ``CheckpointEvent``): the embedding service verifies it,
re-indexes in the background and switches without downtime, as for any embedder release.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from chatreid.config import Settings
from chatreid.embedder.load import load_embedder, resolve_card, write_onnx_checkpoint
from chatreid.embedder.onnx import OnnxEmbedder, probe
from schemas import CheckpointEvent
from schemas.cards import EmbedderCard

__all__ = ["import_onnx", "prepare_onnx"]

Scorer = Callable[[object], dict[str, float]]


def prepare_onnx(model: Path, out: Path, card: str | Path | EmbedderCard | None = None,
                 name: str | None = None) -> tuple[OnnxEmbedder, dict[str, float]]:
    """Verify ``model`` and write its checkpoint directory to ``out``; returns the embedder
    loaded back from ``out`` (what serving will load) and the probe figures."""
    model = Path(model)
    resolved = resolve_card(model, card, name)
    if name and resolved.name != name:
        resolved = resolved.model_copy(update={"name": name})
    write_onnx_checkpoint(model, resolved, out)
    embedder = cast(OnnxEmbedder, load_embedder(out))  # an ONNX checkpoint loads as one
    return embedder, probe(embedder)


def import_onnx(settings: Settings, model: Path, card: str | Path | EmbedderCard | None = None,
                name: str | None = None, *, score: Scorer | None = None) -> CheckpointEvent:
    """Verify, score (``score``: e.g. the rollout gate's validation figures) and push."""
    from chatreid.checkpoints import push

    with tempfile.TemporaryDirectory(prefix="chatreid-import-") as tmp:
        out = Path(tmp) / "checkpoint"
        embedder, figures = prepare_onnx(model, out, card, name)
        if score is not None:
            figures |= score(embedder)
        config = {"backbone": "onnx", "card": embedder.card.model_dump(mode="json"),
                  "source_file": Path(model).name, "dim": embedder.dim}
        return push(settings, out, model="embedder", stage="embedder", version=embedder.version,
                    config=config, metrics=figures)
