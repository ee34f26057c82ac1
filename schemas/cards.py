"""Model cards: how to feed an imported Re-ID model and what it returns (``card.json``).

A card travels with every imported (ONNX) embedder checkpoint. Feeding a model the wrong
convention still returns vectors - silently worse ones - so the card is checked against the
graph at import (layout, input size, output dimension, batch) and the preprocessing follows it
exactly: RGB uint8 crop -> resize to ``height`` x ``width`` -> scale (``unit``: x / 255,
``raw``: 0-255) -> ``(x - mean) / std`` per channel (RGB order) -> channel order -> layout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CARD_MODELS", "EmbedderCard"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbedderCard(BaseModel):
    """Input conventions and output of one Re-ID model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                      description="short name, part of the embedder version")
    layout: Literal["NCHW", "NHWC"] = Field(description="input tensor layout")
    channel_order: Literal["RGB", "BGR"] = Field(description="channel order the model expects")
    scale: Literal["unit", "raw"] = Field(
        description="pixel range before mean/std: 'unit' = x / 255, 'raw' = 0-255")
    mean: tuple[float, float, float] = Field(
        (0.0, 0.0, 0.0), description="per-channel mean in the scaled range, R, G, B order")
    std: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="per-channel std in the scaled range, R, G, B order")
    height: int = Field(ge=16, le=1024, description="input height in pixels")
    width: int = Field(ge=16, le=1024, description="input width in pixels")
    output_dim: int = Field(ge=2, le=65536, description="embedding size the graph returns")
    input_name: str | None = Field(None, description="graph input to feed (None: the only one)")
    output_name: str | None = Field(None, description="graph output to read (None: the first)")
    batch: int | None = Field(None, ge=1, description="fixed batch size of the graph "
                              "(None: dynamic)")
    source: str | None = Field(None, max_length=500, description="where the weights come from")
    licence: str | None = Field(None, max_length=200, description="the weights' licence")

    @model_validator(mode="after")
    def _positive_std(self) -> EmbedderCard:
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    @classmethod
    def preset(cls, convention: str, **fields) -> EmbedderCard:
        """A card from a published convention; ``fields`` fill the rest (name, size, dim).

        ``torchreid``: NCHW, RGB, x / 255 then ImageNet mean/std (torchreid and fast-reid
        exports). ``openvino``: NHWC, BGR, raw 0-255, no normalisation (Open Model Zoo
        Re-ID models, e.g. person-reidentification-retail-0287).
        """
        conventions = {
            "torchreid": {"layout": "NCHW", "channel_order": "RGB", "scale": "unit",
                          "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD},
            "openvino": {"layout": "NHWC", "channel_order": "BGR", "scale": "raw"},
        }
        if convention not in conventions:
            raise ValueError(f"unknown convention {convention!r}; known: {sorted(conventions)}")
        return cls(**{**conventions[convention], **fields})


CARD_MODELS: dict[str, type[BaseModel]] = {"EmbedderCard": EmbedderCard}
