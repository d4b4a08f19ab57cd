"""``resnet9``: the ResNet-9 of David Page's cifar10-fast ("How to train your ResNet", 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TaskSpec
from .base import Backbone, ConvBNAct, register_backbone
from .heads import ClassifierHead
from .resnet import scaled


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` two 3x3 ConvBN-ReLU (no activation after the sum, as in Page's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res1 = ConvBNAct(channels, channels, 3)
        self.res2 = ConvBNAct(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class SimpleDenseHead(nn.Module):
    """3x3 ConvBN-ReLU, 1x1 predictor, bilinear upsample to the image size."""

    def __init__(self, cin: int, out_channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.conv = ConvBNAct(cin, hidden, 3)
        self.predict = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, feats: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        y = self.predict(self.conv(feats[-1]))
        return F.interpolate(y, size=out_hw, mode="bilinear", align_corners=False)


@register_backbone
class ResNet9(Backbone):
    """L = 4 nodes: prep (conv 64), layer1 (conv 128, max-pool 2, residual), layer2 (conv 256,
    max-pool 2), layer3 (conv 512, max-pool 2, residual); taps (3,). Every conv is 3x3
    ConvBN-ReLU; ``width`` scales the channel counts. Classification: global max pool, linear,
    x 0.125; dense tasks: :class:`SimpleDenseHead` on the top feature (stride 8).
    """

    name = "resnet9"
    base_widths: tuple[int, ...] = (64, 128, 256, 512)

    def __init__(self, in_channels: int = 3, width: float = 1.0, head_channels: int = 128) -> None:
        super().__init__(in_channels)
        if width <= 0:
            raise ValueError(f"width must be positive, got {width!r}")
        self.widths = tuple(scaled(c, width) for c in self.base_widths)
        self.head_channels = head_channels
        self.num_layers, self.taps = 4, (3,)

    def make_blocks(self) -> list[nn.Module]:
        w = self.widths
        return [
            ConvBNAct(self.in_channels, w[0], 3),
            nn.Sequential(ConvBNAct(w[0], w[1], 3), nn.MaxPool2d(2), Residual(w[1])),
            nn.Sequential(ConvBNAct(w[1], w[2], 3), nn.MaxPool2d(2)),
            nn.Sequential(ConvBNAct(w[2], w[3], 3), nn.MaxPool2d(2), Residual(w[3])),
        ]

    def make_head(self, task: TaskSpec) -> nn.Module:
        if not task.dense:
            return ClassifierHead(self.widths[-1], task.out_channels, pool="max", scale=0.125)
        return SimpleDenseHead(self.widths[-1], task.out_channels, self.head_channels)
