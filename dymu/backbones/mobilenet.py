"""``mobilenetv2_deeplab``: MobileNetV2 (Sandler et al., CVPR 2018) with a DeepLabv3+ head
(Chen et al. 2018).

The final 1x1 conv to 1280 channels is omitted, as DeepLab does: features end at 320 channels.
Output stride 16 or 8 by replacing the later strides with dilation (as in DeepLab's MobileNetV2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import TaskSpec
from .base import Backbone, ConvBNAct, register_backbone
from .deeplab import DeepLabV3PlusHead, default_rates
from .heads import ClassifierHead
from .resnet import GRANULARITIES

#: The standard (t, c, n, s) table: expansion, channels, repeats, first stride.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

#: Stage nodes, as ranges of rows of :data:`SETTINGS` (the stem joins the first node). Each node
#: ends where the resolution next changes: stride 2 (16 ch), 4 (24 ch), 8 (32 ch), 16 (96 ch),
#: 32 (320 ch; 16 or 8 with dilation).
STAGES: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (2, 3), (3, 5), (5, 7))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, not going below 90% of it (the reference rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise (stride/dilation) -> 1x1 linear project;
    residual when stride 1 and cin == cout. ReLU6 activations."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, dilation=dilation, act=nn.ReLU6),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


@register_backbone
class MobileNetV2DeepLab(Backbone):
    """MobileNetV2 features (stem 3x3/2 conv to 32 ch + 17 inverted residuals, no 1280 conv).

    ``granularity="stage"``: L = 5 nodes (see :data:`STAGES`): stem + 16-ch block (stride 2),
    24-ch blocks (stride 4), 32-ch blocks (stride 8), 64- and 96-ch blocks (stride 16),
    160- and 320-ch blocks; taps (1, 4).
    ``granularity="block"``: L = 18 nodes (stem, then each inverted residual), taps (3, 17).
    Dense heads: DeepLabv3+ on the 24-ch stride-4 tap and the top; classification: average
    pool + linear. ``width_mult`` scales channels as in the reference (multiples of 8).
    """

    name = "mobilenetv2_deeplab"

    def __init__(
        self,
        in_channels: int = 3,
        width_mult: float = 1.0,
        output_stride: int = 16,
        granularity: str = "stage",
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
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult!r}")
        self.width_mult, self.output_stride = width_mult, output_stride
        self.granularity = granularity
        self.stem_channels = make_divisible(32 * width_mult)
        self.channels = tuple(make_divisible(c * width_mult) for _, c, _, _ in SETTINGS)
        self.aspp_channels, self.decoder_channels = aspp_channels, decoder_channels
        self.aspp_rates = (
            tuple(aspp_rates) if aspp_rates is not None else default_rates(output_stride)
        )
        self.low_level_channels, self.dropout = low_level_channels, dropout
        if granularity == "stage":
            self.num_layers, self.taps = len(STAGES), (1, len(STAGES) - 1)
        else:
            self.num_layers = 1 + sum(n for _, _, n, _ in SETTINGS)
            self.taps = (1 + SETTINGS[0][2] + SETTINGS[1][2] - 1, self.num_layers - 1)

    def _rows(self) -> list[list[nn.Module]]:
        """Fresh inverted residuals, one list per row of :data:`SETTINGS`."""
        rows, cin, stride_so_far, dilation = [], self.stem_channels, 2, 1
        for (t, _, n, s), cout in zip(SETTINGS, self.channels, strict=True):
            first_dilation = dilation
            if stride_so_far == self.output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, stride_so_far = s, stride_so_far * s
            blocks = [InvertedResidual(cin, cout, stride, t, first_dilation)]
            blocks += [InvertedResidual(cout, cout, 1, t, dilation) for _ in range(n - 1)]
            rows.append(blocks)
            cin = cout
        return rows

    def make_blocks(self) -> list[nn.Module]:
        stem = ConvBNAct(self.in_channels, self.stem_channels, 3, 2, act=nn.ReLU6)
        rows = self._rows()
        if self.granularity == "block":
            return [stem] + [block for row in rows for block in row]
        nodes: list[nn.Module] = []
        for i, (a, b) in enumerate(STAGES):
            blocks = [block for row in rows[a:b] for block in row]
            nodes.append(nn.Sequential(*([stem] if i == 0 else []), *blocks))
        return nodes

    def make_head(self, task: TaskSpec) -> nn.Module:
        top = self.channels[-1]
        if not task.dense:
            return ClassifierHead(top, task.out_channels)
        return DeepLabV3PlusHead(
            self.channels[1],
            top,
            task.out_channels,
            aspp_channels=self.aspp_channels,
            decoder_channels=self.decoder_channels,
            rates=self.aspp_rates,
            low_reduced=self.low_level_channels,
            dropout=self.dropout,
        )
