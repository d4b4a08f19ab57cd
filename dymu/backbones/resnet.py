"""``resnet34_deeplab``: ResNet-34 (He et al., CVPR 2016) with a DeepLabv3+ head (Chen et al. 2018).

Output stride 16 or 8 by dilating the last stage(s) instead of striding them, as DeepLab does
(torchvision's ``replace_stride_with_dilation`` convention: a dilated stage's first block keeps
the previous dilation, its other blocks use the new one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TaskSpec
from .base import Backbone, ConvBNAct, register_backbone
from .deeplab import DeepLabV3PlusHead, default_rates
from .heads import ClassifierHead

GRANULARITIES = ("stage", "block")


def scaled(channels: int, width: float) -> int:
    """``channels * width``, rounded, at least 1."""
    return max(1, round(channels * width))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ConvBN (optionally dilated), identity or 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride, dilation=dilation)
        self.conv2 = ConvBNAct(cout, cout, 3, 1, dilation=dilation, act=None)
        self.shortcut = (
            ConvBNAct(cin, cout, 1, stride, act=None)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


@register_backbone
class ResNet34DeepLab(Backbone):
    """ResNet-34 encoder (stem + 3, 4, 6, 3 basic blocks of 64, 128, 256, 512 channels).

    ``granularity="stage"``: L = 5 nodes (stem, layer1..layer4), taps (1, 4).
    ``granularity="block"``: L = 17 nodes (stem, then each basic block), taps (3, 16).
    The stem is 7x7/2 ConvBN-ReLU + 3x3/2 max-pool; the low-level tap is the end of layer1
    (stride 4). Dense heads: DeepLabv3+; classification: global average pool + linear.
    ``width`` scales every channel count (1.0 is the standard network).
    """

    name = "resnet34_deeplab"
    depths: tuple[int, ...] = (3, 4, 6, 3)
    base_widths: tuple[int, ...] = (64, 128, 256, 512)

    def __init__(
        self,
        in_channels: int = 3,
        output_stride: int = 16,
        granularity: str = "stage",
        width: float = 1.0,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        aspp_rates: Sequence[int] | None = None,
        low_level_channels: int = 48,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels)
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width!r}")
        self.output_stride, self.granularity = output_stride, granularity
        self.widths = tuple(scaled(c, width) for c in self.base_widths)
        self.aspp_channels, self.decoder_channels = aspp_channels, decoder_channels
        self.aspp_rates = (
            tuple(aspp_rates) if aspp_rates is not None else default_rates(output_stride)
        )
        self.low_level_channels, self.dropout = low_level_channels, dropout
        if granularity == "stage":
            self.num_layers, self.taps = 5, (1, 4)
        else:
            self.num_layers = 1 + sum(self.depths)
            self.taps = (self.depths[0], self.num_layers - 1)

    def _stages(self) -> list[list[nn.Module]]:
        """Fresh basic blocks, stage by stage (torchvision's dilation schedule)."""
        dilate = {16: (False, False, False, True), 8: (False, False, True, True)}
        stages, cin, dilation = [], self.widths[0], 1
        for i, (depth, cout) in enumerate(zip(self.depths, self.widths, strict=True)):
            stride, first_dilation = (1 if i == 0 else 2), dilation
            if dilate[self.output_stride][i]:
                dilation *= stride
                stride = 1
            blocks = [BasicBlock(cin, cout, stride, first_dilation)]
            blocks += [BasicBlock(cout, cout, 1, dilation) for _ in range(depth - 1)]
            stages.append(blocks)
            cin = cout
        return stages

    def make_blocks(self) -> list[nn.Module]:
        stem = nn.Sequential(
            ConvBNAct(self.in_channels, self.widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)
        )
        stages = self._stages()
        if self.granularity == "stage":
            return [stem] + [nn.Sequential(*blocks) for blocks in stages]
        return [stem] + [block for blocks in stages for block in blocks]

    def make_head(self, task: TaskSpec) -> nn.Module:
        top = self.widths[-1]
        if not task.dense:
            return ClassifierHead(top, task.out_channels)
        return DeepLabV3PlusHead(
            self.widths[0],
            top,
            task.out_channels,
            aspp_channels=self.aspp_channels,
            decoder_channels=self.decoder_channels,
            rates=self.aspp_rates,
            low_reduced=self.low_level_channels,
            dropout=self.dropout,
        )
