"""One entry point for every embedder source: :func:`load_embedder`.

* a project checkpoint file (``embedder.pt``, torch MobileNetV2 + head);
* an ``.onnx`` file, with its card (``--card``: a JSON file or a convention name; default:
  ``<file>.card.json`` or ``card.json`` beside it, else the torchreid convention);
* a checkpoint directory as pushed to object storage: ``embedder.pt``, or ``model.onnx`` +
  ``card.json`` (+ ``head.pt``, a head fine-tuned on the frozen ONNX features).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pydantic import ValidationError

from chatreid.config import EmbedderSettings, Settings
from chatreid.embedder.embedder import (
    CHECKPOINT_FILE,
    Embedder,
    EmbeddingHead,
    WeightsError,
    build_embedder,
    embedder_from_checkpoint,
)
from chatreid.embedder.onnx import (
    OnnxEmbedder,
    check_card,
    infer_card,
    inspect_graph,
    load_head,
    open_session,
    save_head,
)
from chatreid.storage import file_sha256
from schemas.cards import EmbedderCard

__all__ = [
    "CARD_FILE",
    "CONVENTIONS",
    "HEAD_FILE",
    "ONNX_FILE",
    "AnyEmbedder",
    "embedder_from_settings",
    "load_embedder",
    "read_card",
    "resolve_card",
    "resolve_embedder",
    "write_onnx_checkpoint",
]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
CARD_FILE = "card.json"
HEAD_FILE = "head.pt"
CONVENTIONS = ("torchreid", "openvino")

AnyEmbedder = Embedder | OnnxEmbedder


def read_card(path: Path) -> EmbedderCard:
    """A card file, validated; a bad one names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"card not found: {path}")
    try:
        return EmbedderCard.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise WeightsError(f"{path} is not a valid embedder card: {exc}") from exc


def _name_from(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem.lower())
    return stem.strip("._-")[:64] or "model"


def resolve_card(model: Path, card: str | Path | EmbedderCard | None = None,
                 name: str | None = None) -> EmbedderCard:
    """The card for ``model``: given, a convention name, a sidecar file, or inferred."""
    model = Path(model)
    if isinstance(card, EmbedderCard):
        return card
    if card is not None and str(card) not in CONVENTIONS:
        return read_card(Path(card))
    if card is None:
        for sidecar in (model.with_suffix(".card.json"), model.parent / CARD_FILE):
            if sidecar.is_file():
                return read_card(sidecar)
    graph = inspect_graph(open_session(model), model)
    return infer_card(graph, name or _name_from(model), None if card is None else str(card))


def _onnx_dir(directory: Path, device: str, batch_size: int, threads: int) -> OnnxEmbedder:
    model, head_path = directory / ONNX_FILE, directory / HEAD_FILE
    card = read_card(directory / CARD_FILE)
    head = load_head(head_path, card.output_dim) if head_path.is_file() else None
    model_id = f"onnx-{card.name}-{file_sha256(model)[:8]}"
    if head is not None:
        model_id += f"-head-{file_sha256(head_path)[:8]}"
    return OnnxEmbedder(model, card, head=head, model_id=model_id, device=device,
                        batch_size=batch_size, threads=threads)


def load_embedder(source: str | Path | None, *, card: str | Path | EmbedderCard | None = None,
                  device: str = "cpu", batch_size: int = 32, threads: int = 0,
                  height: int = 256, width: int = 128) -> AnyEmbedder:
    """The embedder ``source`` names (None: the pip-installed ImageNet MobileNetV2 at
    ``height`` x ``width``; a trained torch checkpoint or an ONNX model brings its own size)."""
    if source is None:
        return build_embedder(height=height, width=width, device=device, batch_size=batch_size)
    path = Path(source)
    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            return embedder_from_checkpoint(path / CHECKPOINT_FILE, device=device,
                                            batch_size=batch_size)
        if (path / ONNX_FILE).is_file():
            return _onnx_dir(path, device, batch_size, threads)
        raise WeightsError(f"{path} holds neither {CHECKPOINT_FILE} nor {ONNX_FILE}")
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise WeightsError(f"ONNX model not found: {path}")
        return OnnxEmbedder(path, resolve_card(path, card), device=device,
                            batch_size=batch_size, threads=threads)
    return embedder_from_checkpoint(path, device=device, batch_size=batch_size)


def embedder_from_settings(cfg: EmbedderSettings) -> AnyEmbedder:
    """The embedder a service runs, as its settings describe it."""
    return load_embedder(cfg.weights, card=cfg.card, device=cfg.device,
                         batch_size=cfg.batch_size, threads=cfg.torch_threads,
                         height=cfg.height, width=cfg.width)


def write_onnx_checkpoint(model: Path, card: EmbedderCard, out: Path,
                          head: EmbeddingHead | None = None) -> Path:
    """A checkpoint directory (``model.onnx``, ``card.json``, optional ``head.pt``) that
    :func:`load_embedder` reads back; the graph is checked against the card first."""
    check_card(card, inspect_graph(open_session(model), model), model)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, out / ONNX_FILE)
    (out / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    if head is not None:
        save_head(head, card.output_dim, out / HEAD_FILE)
    return out


def resolve_embedder(settings: Settings, source: str) -> AnyEmbedder:
    """'latest' (newest embedder checkpoint in object storage, else ImageNet), 'imagenet', an
    embedder checkpoint version (`chatreid checkpoints --model embedder`), or a local file or
    directory: a checkpoint, or an ``.onnx`` Re-ID model (its card: ``embedder.card``)."""
    import tempfile

    from chatreid.checkpoints import find, latest, pull

    cfg = settings.embedder
    kw = {"device": cfg.device, "batch_size": cfg.batch_size, "threads": cfg.torch_threads}
    if source == "imagenet":
        return load_embedder(None, height=cfg.height, width=cfg.width, **kw)
    if Path(source).exists() or source.endswith((".onnx", ".pt")):
        return load_embedder(Path(source), card=cfg.card, **kw)
    event = (latest(settings, "embedder", "embedder") if source == "latest"
             else find(settings, "embedder", source))
    if event is None:
        if source != "latest":
            raise LookupError(f"no embedder checkpoint {source!r} and no such file "
                              "(chatreid checkpoints --model embedder lists the versions)")
        return load_embedder(None, height=cfg.height, width=cfg.width, **kw)
    with tempfile.TemporaryDirectory(prefix="eval-embedder-") as tmp:
        pull(settings, event, Path(tmp))
        return load_embedder(Path(tmp), **kw)


def write_embedder(embedder: AnyEmbedder, out: Path) -> Path:
    """Any loaded embedder as a directory :func:`load_embedder` reads back to the same version
    (a torch checkpoint, or an ONNX model with its card and head)."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(embedder, OnnxEmbedder):
        return write_onnx_checkpoint(embedder.model_path, embedder.card, out, embedder.head)
    embedder.save(out / CHECKPOINT_FILE)
    return out
