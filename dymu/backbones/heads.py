"""Head bodies shared by the backbones: a light dense decoder and a classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConvBNAct


class LiteDecoder(nn.Module):
    """DeepLabv3+-style decoder without ASPP, for small backbones.

    Reads two taps (low-level, top), fuses them at the low-level resolution, predicts
    ``out_channels`` maps and upsamples them bilinearly to the image size.
    """

    def __init__(
        self,
        low_channels: int,
        top_channels: int,
        out_channels: int,
        hidden: int = 32,
        low_reduced: int = 16,
    ) -> None:
        super().__init__()
        self.reduce_low = ConvBNAct(low_channels, low_reduced, 1)
        self.reduce_top = ConvBNAct(top_channels, hidden, 1)
        self.fuse = ConvBNAct(hidden + low_reduced, hidden, 3)
        self.predict = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        low, top = feats[0], feats[-1]
        top = F.interpolate(
            self.reduce_top(top), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        y = self.fuse(torch.cat([self.reduce_low(low), top], dim=1))
        return F.interpolate(self.predict(y), size=out_hw, mode="bilinear", align_corners=False)


class ClassifierHead(nn.Module):
    """Global pooling of the top tap, then one linear layer to ``classes`` logits."""

    def __init__(self, channels: int, classes: int, pool: str = "avg", scale: float = 1.0) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.scale = scale
        self.linear = nn.Linear(channels, classes)

    def forward(self, feats: Sequence[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        top = feats[-1]
        pooled = top.amax(dim=(2, 3)) if self.pool == "max" else top.mean(dim=(2, 3))
        return self.linear(pooled) * self.scale
