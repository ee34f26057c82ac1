"""The prefilter embedder: crops in, unit vectors out.

Two kinds behind one loader (:func:`load_embedder`): the project's torch MobileNetV2
(:class:`Embedder`: the pip-installed ImageNet default, or a trained checkpoint) and any Re-ID
backbone exported to ONNX (:class:`OnnxEmbedder`, with a model card; optionally a head
fine-tuned on its frozen features).
"""

from chatreid.embedder.embedder import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    Embedder,
    EmbeddingHead,
    ReIDNet,
    WeightsError,
    build_embedder,
    embedder_from_checkpoint,
    imagenet_model,
    imagenet_weights_path,
)
from chatreid.embedder.load import (
    CARD_FILE,
    HEAD_FILE,
    ONNX_FILE,
    AnyEmbedder,
    embedder_from_settings,
    load_embedder,
    read_card,
    resolve_card,
    write_onnx_checkpoint,
)
from chatreid.embedder.mobilenetv2 import MobileNetV2, MobileNetV2Config
from chatreid.embedder.onnx import OnnxEmbedder, probe

__all__ = [
    "CARD_FILE",
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "HEAD_FILE",
    "ONNX_FILE",
    "AnyEmbedder",
    "Embedder",
    "EmbeddingHead",
    "MobileNetV2",
    "MobileNetV2Config",
    "OnnxEmbedder",
    "ReIDNet",
    "WeightsError",
    "build_embedder",
    "embedder_from_checkpoint",
    "embedder_from_settings",
    "imagenet_model",
    "imagenet_weights_path",
    "load_embedder",
    "probe",
    "read_card",
    "resolve_card",
    "write_onnx_checkpoint",
]
