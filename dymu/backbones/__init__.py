"""The backbones of the anchor net: the built-in recipes, registered by importing this package.

:mod:`.base` holds the registry (:data:`BACKBONES`, :func:`register_backbone`) and the recipe
class; :func:`build_backbone` turns a :class:`dymu.config.BackboneConfig` into a recipe.
"""

from __future__ import annotations

from ..config import BackboneConfig
from ..errors import ConfigError
from . import mobilenet, resnet, resnet9, small  # noqa: F401  (register the built-in recipes)
from .base import BACKBONES, Backbone, ConvBNAct, FoldedConv, register_backbone


def build_backbone(config: BackboneConfig, in_channels: int) -> Backbone:
    """The recipe ``config`` names, with its options; a :class:`ConfigError` for an unknown name,
    options the recipe does not take, or taps that do not end at the top layer."""
    if config.name not in BACKBONES:
        raise ConfigError(f"unknown backbone {config.name!r}; known: {sorted(BACKBONES)}")
    try:
        backbone = BACKBONES[config.name](in_channels=in_channels, **config.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for backbone {config.name!r}: {exc}") from exc
    if (
        not backbone.taps
        or backbone.taps[-1] != backbone.num_layers - 1
        or list(backbone.taps) != sorted(set(backbone.taps))
    ):
        raise ConfigError(f"backbone {config.name!r} has invalid taps {backbone.taps}")
    return backbone


__all__ = [
    "BACKBONES",
    "Backbone",
    "ConvBNAct",
    "FoldedConv",
    "build_backbone",
    "register_backbone",
]
