"""Synthetic multi-camera person re-identification world (``chatreid synth``)."""

from chatreid.synth.layouts import LayoutInfo, WorldManifest, generate_world
from chatreid.synth.live import LiveCrop, iter_live_crops
from chatreid.synth.world import SynthConfig

__all__ = [
    "LayoutInfo",
    "LiveCrop",
    "SynthConfig",
    "WorldManifest",
    "generate_world",
    "iter_live_crops",
]
