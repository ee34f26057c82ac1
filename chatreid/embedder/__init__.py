"""The prefilter embedder: a small MobileNetV2 that maps person crops to unit vectors."""

from chatreid.embedder.embedder import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    Embedder,
    EmbeddingHead,
    ReIDNet,
    WeightsError,
    build_embedder,
    embedder_from_checkpoint,
    embedder_from_settings,
    imagenet_model,
    imagenet_weights_path,
)
from chatreid.embedder.mobilenetv2 import MobileNetV2, MobileNetV2Config

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "Embedder",
    "EmbeddingHead",
    "MobileNetV2",
    "MobileNetV2Config",
    "ReIDNet",
    "WeightsError",
    "build_embedder",
    "embedder_from_checkpoint",
    "embedder_from_settings",
    "imagenet_model",
    "imagenet_weights_path",
]
