"""Re-ID backbones from ONNX files (the field's exchange format), run through onnxruntime.

:class:`OnnxEmbedder` is the same kind of object as the torch :class:`~.embedder.Embedder`
(``embed``, ``version``, ``dim``, ``batch_size``): crops in, unit vectors out. Its
preprocessing follows the model's :class:`~schemas.cards.EmbedderCard`, which
:func:`inspect_graph` / :func:`check_card` hold against the graph before anything embeds, and
:func:`probe` runs the model on two probe crops: a file that is not a Re-ID embedder (wrong
input rank, no (batch, dim) output, NaNs, a constant output) is a clear
:class:`~.embedder.WeightsError`, never silent garbage.

An optional trained head (:class:`~.embedder.EmbeddingHead`, ``head.pt``) on top of the ONNX
features is how an imported backbone is fine-tuned: the graph stays frozen (it cannot be
trained), the head learns on the target images (``chatreid.tuning.embedder_training``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chatreid.embedder.embedder import EmbeddingHead, WeightsError, _to_rgb
from chatreid.storage import file_sha256
from schemas.cards import EmbedderCard

__all__ = [
    "HEAD_FORMAT",
    "GraphInfo",
    "OnnxEmbedder",
    "check_card",
    "infer_card",
    "inspect_graph",
    "load_head",
    "open_session",
    "probe",
    "probe_crops",
    "save_head",
]

log = logging.getLogger(__name__)

HEAD_FORMAT = "chatreid-embedder-head/1"


@dataclass(frozen=True)
class GraphInfo:
    """What the graph itself says about its input and output (``None``: a dynamic axis)."""

    input_name: str
    input_shape: tuple[int | None, ...]
    input_type: str
    output_name: str
    output_shape: tuple[int | None, ...]

    @property
    def layout(self) -> str | None:
        """``NCHW`` or ``NHWC`` when axis 1 or 3 is a static 3 (the channels), else None."""
        shape = self.input_shape
        if shape[1] == 3 and shape[3] != 3:
            return "NCHW"
        if shape[3] == 3 and shape[1] != 3:
            return "NHWC"
        return None

    def size(self, layout: str) -> tuple[int | None, int | None]:
        """(height, width) as the graph fixes them under ``layout``."""
        shape = self.input_shape
        return (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def open_session(path: Path, device: str = "cpu", threads: int = 0):
    """An onnxruntime session on ``path``; CUDA when ``device`` names it (and it is there)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX model not found: {path}")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise WeightsError(f"device {device!r}: this onnxruntime has no CUDA provider "
                               "(install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: initializer warnings are not the user's
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise WeightsError(f"cannot load ONNX model {path} (truncated, corrupt or not an ONNX "
                           f"file?): {str(exc).strip().splitlines()[0][:300]}") from exc


def inspect_graph(session, path: Path | str = "model") -> GraphInfo:
    """The one image input and the embedding output; a graph of another shape is refused."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise WeightsError(f"{path}: a Re-ID embedder takes one image input, this graph takes "
                           f"{len(inputs)} ({names})")
    inp, out = inputs[0], outputs[0]
    if len(inp.shape) != 4:
        raise WeightsError(f"{path}: input {inp.name!r} has rank {len(inp.shape)} "
                           f"({inp.shape}); an image model takes a rank-4 batch (N, C, H, W) "
                           "or (N, H, W, C)")
    if inp.type != "tensor(float)":
        raise WeightsError(f"{path}: input {inp.name!r} is {inp.type}, expected tensor(float)")
    out_shape = tuple(_dim(d) for d in out.shape)
    if len(out_shape) == 4 and out_shape[2:] == (1, 1):
        out_shape = out_shape[:2]  # (N, D, 1, 1) pooled maps: squeezed when read
    if len(out_shape) != 2:
        raise WeightsError(f"{path}: output {out.name!r} has shape {out.shape}; a Re-ID "
                           "embedder returns one vector per image, (batch, dim)")
    return GraphInfo(inp.name, tuple(_dim(d) for d in inp.shape), inp.type, out.name, out_shape)


def infer_card(graph: GraphInfo, name: str, convention: str | None = None) -> EmbedderCard:
    """A card from the graph's static shapes plus a published convention.

    Without ``convention`` the torchreid one (NCHW, RGB, ImageNet mean/std) is assumed - the
    usual export - but only for an NCHW graph: an NHWC graph needs a card or ``openvino``.
    """
    layout = graph.layout
    if layout is None:
        raise WeightsError(f"{name}: the input shape {graph.input_shape} does not show a 3-channel "
                           "axis; give a card (--card)")
    if convention is None:
        if layout != "NCHW":
            raise WeightsError(f"{name}: the graph takes {layout} input, which the default "
                               "torchreid convention (NCHW, RGB, ImageNet mean/std) does not "
                               "fit; give a card (--card FILE.json, or --card openvino for Open "
                               "Model Zoo models)")
        convention = "torchreid"
    height, width = graph.size(layout)
    dim = graph.output_shape[1]
    missing = [n for n, v in (("height", height), ("width", width), ("output_dim", dim))
               if v is None]
    if missing:
        raise WeightsError(f"{name}: the graph leaves {', '.join(missing)} dynamic; give a card "
                           "that states them")
    return EmbedderCard.preset(convention, name=name, height=height, width=width,
                               output_dim=dim, input_name=graph.input_name,
                               output_name=graph.output_name, batch=graph.input_shape[0])


def check_card(card: EmbedderCard, graph: GraphInfo, path: Path | str = "model") -> None:
    """Every fact the card states that the graph also fixes must agree with the graph."""
    problems = []
    if card.input_name and card.input_name != graph.input_name:
        problems.append(f"input {card.input_name!r} (graph: {graph.input_name!r})")
    if card.output_name and card.output_name != graph.output_name:
        problems.append(f"output {card.output_name!r} (graph: {graph.output_name!r})")
    channels = graph.input_shape[1] if card.layout == "NCHW" else graph.input_shape[3]
    if channels not in (None, 3):
        problems.append(f"layout {card.layout} (the graph's channel axis there is {channels}; "
                        f"its input is {graph.input_shape})")
    else:
        height, width = graph.size(card.layout)
        if height not in (None, card.height) or width not in (None, card.width):
            problems.append(f"input size {card.height}x{card.width} (graph: {height}x{width})")
    if graph.output_shape[1] not in (None, card.output_dim):
        problems.append(f"output_dim {card.output_dim} (graph: {graph.output_shape[1]})")
    if graph.input_shape[0] is not None and card.batch != graph.input_shape[0]:
        problems.append(f"batch {card.batch} (the graph's batch is fixed at "
                        f"{graph.input_shape[0]})")
    if problems:
        raise WeightsError(f"{path}: the card does not match the graph: " + "; ".join(problems))


def save_head(head: EmbeddingHead, in_dim: int, path: Path) -> Path:
    """Write a head trained on ``in_dim``-d model features, for :func:`load_head`."""
    import torch

    blob = {"format": HEAD_FORMAT, "config": {**head.config(), "in_dim": in_dim},
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic, like Embedder.save
    return Path(path)


def load_head(path: Path, in_dim: int) -> EmbeddingHead:
    """A trained head written by :func:`save_head` (strict)."""
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read embedder head {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
        raise WeightsError(f"{path} is not a {HEAD_FORMAT} file")
    cfg = blob["config"]
    if cfg.get("in_dim") != in_dim:
        raise WeightsError(f"{path}: the head takes {cfg.get('in_dim')}-d features, the model "
                           f"gives {in_dim}")
    head = EmbeddingHead(in_dim, cfg.get("projection_dim"), bool(cfg.get("bnneck")))
    try:
        head.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: the head's weights do not fit: {exc}") from exc
    return head.eval()


class OnnxEmbedder:
    """Batched onnxruntime inference with the card's preprocessing (and an optional head)."""

    def __init__(self, model_path: Path, card: EmbedderCard, *, head: EmbeddingHead | None = None,
                 model_id: str | None = None, device: str = "cpu", batch_size: int = 32,
                 threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model_path = Path(model_path)
        self.session = open_session(self.model_path, device, threads)
        self.graph = inspect_graph(self.session, self.model_path)
        check_card(card, self.graph, self.model_path)
        self.card, self.head, self.device = card, head, device
        self.height, self.width = card.height, card.width
        self.batch_size = batch_size
        self.feature_dim = card.output_dim
        self.dim: int = head.out_dim if head is not None else card.output_dim
        self.model_sha256 = file_sha256(self.model_path)
        self.model_id = model_id or f"onnx-{card.name}-{self.model_sha256[:8]}"
        # as for the torch embedder: the input size is part of the embedding space
        self.version: str = f"{self.model_id}@{self.height}x{self.width}"
        self._mean = np.asarray(card.mean, np.float32)
        self._std = np.asarray(card.std, np.float32)

    def __repr__(self) -> str:
        return f"OnnxEmbedder(version={self.version!r}, dim={self.dim}, device={self.device!r})"

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Crops -> the float32 batch the card describes."""
        size = (self.width, self.height)
        rgb = np.stack([np.asarray(_to_rgb(img).resize(size, Image.Resampling.BILINEAR)
                                   if img.size != size else _to_rgb(img)) for img in images])
        x = rgb.astype(np.float32)
        if self.card.scale == "unit":
            x /= 255.0
        x = (x - self._mean) / self._std
        if self.card.channel_order == "BGR":
            x = x[..., ::-1]
        if self.card.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The graph's raw output, (n, output_dim) float32, not normalised, no head."""
        out = np.empty((len(images), self.feature_dim), np.float32)
        step = self.card.batch or self.batch_size
        for start in range(0, len(images), step):
            chunk = self.preprocess(images[start : start + step])
            if self.card.batch and len(chunk) < self.card.batch:  # a fixed batch: pad the tail
                pad = np.zeros((self.card.batch - len(chunk), *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            (raw,) = self.session.run([self.graph.output_name], {self.graph.input_name: chunk})
            raw = np.asarray(raw, np.float32).reshape(len(chunk), -1)
            if raw.shape[1] != self.feature_dim:
                raise WeightsError(f"{self.model_path}: the graph returned {raw.shape[1]}-d "
                                   f"vectors, the card says {self.feature_dim}")
            n = min(step, len(images) - start)
            out[start : start + n] = raw[:n]
        return out

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed crops; returns float32 (n, dim) with unit L2 norm per row."""
        x = self.features(images)
        if self.head is not None:
            import torch

            with torch.inference_mode():
                x = self.head(torch.from_numpy(x)).numpy()
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def probe_crops() -> list[Image.Image]:
    """Two deterministic person-shaped probe crops that differ in colour and shape."""
    crops = []
    for upper, lower, skin, shift in (((200, 40, 40), (30, 40, 120), (220, 180, 150), 0),
                                      ((40, 160, 60), (90, 90, 90), (120, 80, 60), 6)):
        arr = np.full((256, 128, 3), (120, 130, 125), np.uint8)
        arr[20:60, 44 + shift : 84 + shift] = skin  # head
        arr[60:150, 30:98] = upper  # torso
        arr[150:240, 36 + shift : 60 + shift] = lower  # legs
        arr[150:240, 68:92] = lower
        noise = np.random.default_rng(shift).integers(-12, 13, arr.shape)
        crops.append(Image.fromarray(np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8)))
    return crops


def probe(embedder) -> dict[str, float]:
    """Run any embedder on the probe crops; refuse NaN, wrong-size or constant output."""
    crops = probe_crops()
    raw = embedder.features(crops) if hasattr(embedder, "features") else None
    vectors = embedder.embed(crops)
    where = getattr(embedder, "model_path", embedder.version)
    if vectors.shape != (len(crops), embedder.dim):
        raise WeightsError(f"{where}: probe gave shape {vectors.shape}, expected "
                           f"({len(crops)}, {embedder.dim})")
    if not np.isfinite(vectors).all() or (raw is not None and not np.isfinite(raw).all()):
        raise WeightsError(f"{where}: the model returns NaN or infinite values on a probe crop")
    if raw is not None and float(np.abs(raw).max()) == 0.0:
        raise WeightsError(f"{where}: the model returns all-zero vectors on a probe crop")
    cosine = float(vectors[0] @ vectors[1])
    if cosine > 0.99999:
        raise WeightsError(f"{where}: the model returns the same vector for two different "
                           "crops; not an image embedder (or the card's preprocessing is wrong)")
    return {"probe_cosine": cosine}
