"""Pretrained encoders: ImageNet weights in torchvision's or timm's key names, into every stream.

The paper's streams start from ImageNet-pretrained encoders (§4.2, App. G). ``[backbone] init =
"PATH.safetensors"`` names such a file; :func:`load_encoder` copies it into the encoder blocks of
every stream before stage 0 (the heads keep their fresh initialization). dymu never downloads
weights and never reads pickle files (loading one runs arbitrary code): docs/training.md says
where a safetensors export comes from.

A layout maps the recipe's own key names onto the file's. The file's layout is recognised by a
key only that layout holds; every key of the encoder must be in the file with the same shape,
and every key of the file must be used, except the parts of the ImageNet classifier that an
encoder does not have (its last layers). Anything else is one :class:`ConfigError` that lists
the missing, unexpected and mis-shaped keys on one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import ConfigError
from .base import Backbone, ConvBNAct
from .mobilenet import SETTINGS, InvertedResidual
from .resnet import BasicBlock, ResNet34DeepLab

#: BatchNorm's step counter: not a weight, and often left out of exported files.
STEP_COUNTER = "num_batches_tracked"
#: At most this many keys of each kind are named in an error (the count says how many more).
SHOWN_KEYS = 8

KeyMap = dict[str, str]  # the encoder's key -> the file's key


@dataclass(frozen=True)
class Layout:
    """One naming of a backbone's ImageNet weights."""

    name: str
    marker: str  # a key that files in this layout hold and files in the others do not
    unused: tuple[str, ...]  # key prefixes of the classifier, which the encoder does not have
    keys: Callable[[Backbone, nn.Module], KeyMap]


def _units(blocks: nn.Module, unit: type[nn.Module]) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The stem's module name (the first ConvBNAct) and every residual unit's, in order."""
    named = list(blocks.named_modules())
    stem = next(name for name, m in named if isinstance(m, ConvBNAct))
    return stem, [(name, m) for name, m in named if isinstance(m, unit)]


def _conv_bn(ours: str, conv: str, bn: str) -> KeyMap:
    """A ConvBNAct's conv weight and BatchNorm tensors under the file's names."""
    keys = {f"{ours}.0.weight": f"{conv}.weight"}
    for t in ("weight", "bias", "running_mean", "running_var", STEP_COUNTER):
        keys[f"{ours}.1.{t}"] = f"{bn}.{t}"
    return keys


def _resnet_keys(backbone: Backbone, blocks: nn.Module) -> KeyMap:
    """torchvision's (and timm's) ResNet names: conv1/bn1, layer{s}.{k}.conv1/bn1/.../downsample."""
    if not isinstance(backbone, ResNet34DeepLab):
        raise ConfigError(f"the ResNet-34 layout does not fit backbone {backbone.name!r}")
    stem, units = _units(blocks, BasicBlock)
    keys = _conv_bn(stem, "conv1", "bn1")
    places = [(s, k) for s, depth in enumerate(backbone.depths) for k in range(depth)]
    for (name, block), (s, k) in zip(units, places, strict=True):
        theirs = f"layer{s + 1}.{k}"
        keys |= _conv_bn(f"{name}.conv1", f"{theirs}.conv1", f"{theirs}.bn1")
        keys |= _conv_bn(f"{name}.conv2", f"{theirs}.conv2", f"{theirs}.bn2")
        if isinstance(block.shortcut, ConvBNAct):
            keys |= _conv_bn(f"{name}.shortcut", f"{theirs}.downsample.0", f"{theirs}.downsample.1")
    return keys


def _torchvision_mobilenet_keys(backbone: Backbone, blocks: nn.Module) -> KeyMap:
    """torchvision's MobileNetV2: features.0 (stem), features.{i}.conv.* (inverted residuals)."""
    stem, units = _units(blocks, InvertedResidual)
    keys = _conv_bn(stem, "features.0.0", "features.0.1")
    for i, (name, block) in enumerate(units, start=1):
        last = len(block.conv) - 1  # the linear projection: a bare conv and BN in torchvision
        for j in range(len(block.conv)):
            theirs = f"features.{i}.conv"
            if j < last:
                keys |= _conv_bn(f"{name}.conv.{j}", f"{theirs}.{j}.0", f"{theirs}.{j}.1")
            else:
                keys |= _conv_bn(f"{name}.conv.{j}", f"{theirs}.{j}", f"{theirs}.{j + 1}")
    return keys


def _timm_mobilenet_keys(backbone: Backbone, blocks: nn.Module) -> KeyMap:
    """timm's mobilenetv2_100: conv_stem/bn1, blocks.{row}.{k}.conv_pw/conv_dw/conv_pwl."""
    stem, units = _units(blocks, InvertedResidual)
    keys = _conv_bn(stem, "conv_stem", "bn1")
    places = [(row, k) for row, (_, _, n, _) in enumerate(SETTINGS) for k in range(n)]
    for (name, block), (row, k) in zip(units, places, strict=True):
        theirs = f"blocks.{row}.{k}"
        # An expansion of 1 has no 1x1 expand conv: timm's DepthwiseSeparable (dw, then pw).
        parts = (
            [("conv_dw", "bn1"), ("conv_pw", "bn2")]
            if len(block.conv) == 2
            else [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")]
        )
        for j, (conv, bn) in enumerate(parts):
            keys |= _conv_bn(f"{name}.conv.{j}", f"{theirs}.{conv}", f"{theirs}.{bn}")
    return keys


#: The layouts each backbone can be initialized from (ResNet-9 and small_resnet have none:
#: neither torchvision nor timm publishes ImageNet weights for them).
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "resnet34_deeplab": (
        Layout("torchvision/timm", "layer1.0.conv1.weight", ("fc.",), _resnet_keys),
    ),
    "mobilenetv2_deeplab": (
        Layout(
            "torchvision",
            "features.0.0.weight",
            ("features.18.", "classifier."),
            _torchvision_mobilenet_keys,
        ),
        Layout(
            "timm", "conv_stem.weight", ("conv_head.", "bn2.", "classifier."), _timm_mobilenet_keys
        ),
    ),
}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a :class:`ConfigError` for anything else."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: pretrained weights are read from .safetensors files only")
    if not path.is_file():
        raise ConfigError(
            f"backbone.init: no such file {path} (docs/training.md, 'Pretrained encoders')"
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from exc


def detect_layout(name: str, tensors: dict[str, torch.Tensor], path: Any) -> Layout:
    """The layout of ``tensors`` among those of backbone ``name``."""
    layouts = LAYOUTS.get(name)
    if not layouts:
        raise ConfigError(
            f"backbone {name!r} has no pretrained layout; backbone.init works with "
            f"{', '.join(sorted(LAYOUTS))}"
        )
    for layout in layouts:
        if layout.marker in tensors:
            return layout
    known = " or ".join(f"{lay.name} ({lay.marker})" for lay in layouts)
    first = ", ".join(list(tensors)[:3])
    raise ConfigError(f"{path}: not a {name} encoder in {known} key names; it holds {first}, ...")


def _listed(what: str, keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return f"{what} ({len(keys)}): {shown}{more}"


def match_keys(
    keymap: KeyMap, ours: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], layout: Layout
) -> list[str]:
    """The problems of loading ``tensors`` through ``keymap``: missing, unexpected, mis-shaped."""
    missing = [
        theirs
        for mine, theirs in keymap.items()
        if theirs not in tensors and not mine.endswith(STEP_COUNTER)
    ]
    used = set(keymap.values())
    unexpected = [k for k in tensors if k not in used and not k.startswith(layout.unused)]
    shapes = [
        f"{theirs} {tuple(tensors[theirs].shape)} for {tuple(ours[mine].shape)}"
        for mine, theirs in keymap.items()
        if theirs in tensors and tensors[theirs].shape != ours[mine].shape
    ]
    problems = [("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)]
    return [_listed(what, keys) for what, keys in problems if keys]


def load_encoder(backbone: Backbone, encoders: Sequence[nn.Module], path: str | os.PathLike) -> str:
    """Copy the pretrained encoder in ``path`` into each of ``encoders`` (every stream's blocks,
    as ``backbone`` built them); returns the name of the layout the file was read in."""
    name = backbone.name
    tensors = read_weights(path)
    layout = detect_layout(name, tensors, path)
    ours = encoders[0].state_dict()
    keymap = layout.keys(backbone, encoders[0])
    problems = match_keys(keymap, ours, tensors, layout)
    if problems:
        raise ConfigError(
            f"{path} does not fit {name}'s encoder ({layout.name} names): " + "; ".join(problems)
        )
    state = {mine: tensors[theirs] for mine, theirs in keymap.items() if theirs in tensors}
    for encoder in encoders:
        encoder.load_state_dict(state, strict=False)  # strict: every key was checked above
    return layout.name
