"""DeepLabv3+ head body: ASPP + decoder (Chen et al., ECCV 2018, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation"; ASPP from DeepLabv3, Chen et al. 2017).

Plain (non-separable) 3x3 convolutions throughout, as in the common ResNet/MobileNet DeepLabv3+
re-implementations. Reads two taps: ``feats[0]`` the low-level (stride-4) feature, ``feats[-1]``
the top feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConvBNAct


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 ConvBNAct -> bilinear upsample.

    The BN sees one value per channel and sample, so training needs batch > 1 (as in any
    DeepLab); evaluation works at batch 1.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))
        return _resize(y, x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, one 3x3 per atrous rate, image pooling; 1x1 project."""

    def __init__(
        self, cin: int, cout: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.0
    ) -> None:
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if not rates or min(rates) < 1:
            raise ValueError(f"ASPP rates must be positive ints, got {rates}")
        self.branches = nn.ModuleList(
            [ConvBNAct(cin, cout, 1)]
            + [ConvBNAct(cin, cout, 3, dilation=r) for r in rates]
            + [ASPPPooling(cin, cout)]
        )
        self.project = ConvBNAct(cout * len(self.branches), cout, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the top tap, upsampled to the low-level tap and fused with its 1x1 reduction
    (``low_reduced`` = 48 ch), two 3x3 ConvBNAct, a 1x1 predictor, bilinear upsample to out_hw.
    """

    def __init__(
        self,
        low_channels: int,
        top_channels: int,
        out_channels: int,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        low_reduced: int = 48,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(top_channels, aspp_channels, rates, dropout)
        self.reduce_low = ConvBNAct(low_channels, low_reduced, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(aspp_channels + low_reduced, decoder_channels, 3),
            ConvBNAct(decoder_channels, decoder_channels, 3),
        )
        self.predict = nn.Conv2d(decoder_channels, out_channels, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        low, top = feats[0], feats[-1]
        top = _resize(self.aspp(top), low.shape[-2:])
        y = self.fuse(torch.cat([self.reduce_low(low), top], dim=1))
        return _resize(self.predict(y), out_hw)


def default_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's atrous rates: (6, 12, 18) at output stride 16, doubled at 8."""
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)
