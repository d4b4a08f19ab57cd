"""What every backbone builds on: the recipe class, its registry, and the foldable conv block.

A backbone is a recipe for one stream of the anchor net (paper §3.1): ``num_layers`` blocks, one
head per task, and the ``taps`` (layers whose outputs the heads read). Recipes register by name
with :func:`register_backbone`; :func:`dymu.backbones.build_backbone` builds one from a
:class:`dymu.config.BackboneConfig`. This module imports no recipe, so recipes can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..config import TaskSpec
from ..errors import ConfigError


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation; foldable into one biased conv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act: Callable[[], nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(
                cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False
            ),
            nn.BatchNorm2d(cout),
            act(inplace=True) if act is not None else nn.Identity(),
        )

    @torch.no_grad()
    def fold_(self) -> None:
        """Fold the BN (eval statistics, current gamma/beta) into the conv, in place.

        w' = w * g / sqrt(var + eps);  b' = beta + (b - mean) * g / sqrt(var + eps).
        """
        conv, bn = self[0], self[1]
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        # Replace the tensors rather than building a new Conv2d: module construction would
        # re-initialize weights only to overwrite them (a third of materialization time).
        conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
        self[1] = nn.Identity()


class FoldedConv(nn.Conv2d):
    """A folded :class:`ConvBNAct` as one module: its biased conv, then its activation.

    The same parameters and output as the folded block, in one module where the block is four
    (the ``Sequential``, the conv, the ``Identity`` the BN left, the activation): a new
    preference copies one module per adapted conv instead of two, and a forward calls half as
    many (docs/benchmarks.md, "Issue 15, item 1: a folded block as one module, a frozen
    model"). A subclass of ``nn.Conv2d``, so FLOP counting and ONNX export see a convolution.
    """

    @classmethod
    def from_block(cls, block: ConvBNAct) -> FoldedConv:
        """The folded ``block`` (:meth:`ConvBNAct.fold_` first) as one module, sharing its
        parameters and activation module."""
        conv, bn, act = block
        if isinstance(bn, nn.BatchNorm2d):
            raise ValueError("fold the ConvBNAct (fold_) before flattening it")
        # on the meta device: no weights allocated and initialized only to be replaced
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        new.act = act
        return new.train(block.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self._conv_forward(x, self.weight, self.bias))


class Backbone:
    """Recipe for one stream. Subclasses set ``num_layers``/``taps`` and build fresh modules.

    ``taps`` are ascending 0-based layer indices whose outputs the head reads, ending with the
    top layer ``num_layers - 1``. Every stream of an anchor net uses the same recipe, so node
    outputs at a layer have the same shape in every stream (a child can read any parent).
    """

    name: ClassVar[str]
    num_layers: int
    taps: tuple[int, ...]

    def __init__(self, in_channels: int = 3) -> None:
        self.in_channels = in_channels

    def make_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def make_head(self, task: TaskSpec) -> nn.Module:
        """The body of ``task``'s head: ``forward(feats, out_hw) -> tensor``."""
        raise NotImplementedError


#: Backbones by name. Register new ones with :func:`register_backbone`.
BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make ``cls`` buildable by its ``name`` (each name once)."""
    if cls.name in BACKBONES:
        raise ConfigError(f"backbone {cls.name!r} is registered twice")
    BACKBONES[cls.name] = cls
    return cls
