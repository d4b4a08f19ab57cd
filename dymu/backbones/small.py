"""``small_resnet``: the default backbone, a small residual CNN that trains on 2 CPU cores."""

from __future__ import annotations

from torch import nn

from ..config import TaskSpec
from .base import Backbone, ConvBNAct, register_backbone
from .heads import ClassifierHead, LiteDecoder
from .resnet import BasicBlock


@register_backbone
class SmallResNet(Backbone):
    """Stem (3x3 conv, stride 2) + basic block, then one basic block per further layer.

    Defaults give L = 5 layers with output strides 2, 4, 4, 8, 8; dense heads are a
    :class:`LiteDecoder` over layer 1 (stride 4) and the top layer.
    """

    name = "small_resnet"

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 24, 32, 48, 64),
        strides: tuple[int, ...] = (2, 2, 1, 2, 1),
        head_channels: int = 32,
        low_level_layer: int = 1,
    ) -> None:
        super().__init__(in_channels)
        if len(widths) != len(strides) or not widths:
            raise ValueError("widths and strides need the same, non-zero length")
        if not 0 <= low_level_layer < len(widths):
            raise ValueError(f"low_level_layer must be in [0, {len(widths)})")
        self.widths, self.strides = tuple(widths), tuple(strides)
        self.head_channels = head_channels
        self.num_layers = len(widths)
        self.taps = tuple(sorted({low_level_layer, self.num_layers - 1}))

    def make_blocks(self) -> list[nn.Module]:
        w, s = self.widths, self.strides
        blocks: list[nn.Module] = [
            nn.Sequential(ConvBNAct(self.in_channels, w[0], 3, s[0]), BasicBlock(w[0], w[0]))
        ]
        blocks += [BasicBlock(w[l - 1], w[l], s[l]) for l in range(1, self.num_layers)]
        return blocks

    def make_head(self, task: TaskSpec) -> nn.Module:
        top = self.widths[-1]
        if not task.dense:
            return ClassifierHead(top, task.out_channels)
        return LiteDecoder(
            self.widths[self.taps[0]],
            top,
            task.out_channels,
            hidden=self.head_channels,
            low_reduced=self.head_channels // 2,
        )
