"""ResNet-34 / MobileNetV2 DeepLabv3+ and ResNet-9 backbones: shapes, ASPP, parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dymu.anchor import (
    AnchorNet,
    ConvBNAct,
    FoldedConv,
    build_backbone,
    flatten_folded,
    fold_batchnorm_,
)
from dymu.backbones.deeplab import ASPP, DeepLabV3PlusHead
from dymu.config import BackboneConfig, ModelConfig, TaskSpec

TASKS = (
    TaskSpec(name="seg", kind="segmentation", classes=5),
    TaskSpec(name="depth", kind="depth"),
    TaskSpec(name="cls", kind="classification", classes=4),
)
SMALL_RESNET34 = {
    "width": 0.25,
    "aspp_channels": 32,
    "decoder_channels": 32,
    "low_level_channels": 16,
}
SMALL_MOBILENET = {
    "width_mult": 0.25,
    "aspp_channels": 32,
    "decoder_channels": 32,
    "low_level_channels": 16,
}

# (backbone, options, L, taps, output stride of the top tap)
CASES = [
    ("resnet34_deeplab", {**SMALL_RESNET34}, 5, (1, 4), 16),
    ("resnet34_deeplab", {**SMALL_RESNET34, "granularity": "block"}, 17, (3, 16), 16),
    ("resnet34_deeplab", {**SMALL_RESNET34, "output_stride": 8}, 5, (1, 4), 8),
    ("mobilenetv2_deeplab", {**SMALL_MOBILENET}, 5, (1, 4), 16),
    ("mobilenetv2_deeplab", {**SMALL_MOBILENET, "granularity": "block"}, 18, (3, 17), 16),
    ("mobilenetv2_deeplab", {**SMALL_MOBILENET, "output_stride": 8}, 5, (1, 4), 8),
    ("resnet9", {"width": 0.25}, 4, (3,), 8),
]


def n_params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def anchor(name: str, options: dict) -> AnchorNet:
    return AnchorNet(
        ModelConfig(
            tasks=TASKS, backbone=BackboneConfig(name=name, options=options), input_size=(64, 64)
        )
    )


def tap_features(net: AnchorNet, x: torch.Tensor, stream: int = 0) -> list[torch.Tensor]:
    feats = []
    for l in range(net.num_layers):
        x = net.node(l, stream)(x)
        if l in net.taps:
            feats.append(x)
    return feats


@pytest.mark.parametrize(("name", "options", "layers", "taps", "stride"), CASES)
def test_shapes_and_soft_forward(name, options, layers, taps, stride):
    torch.manual_seed(0)
    net = anchor(name, options)
    assert (net.num_layers, net.taps) == (layers, taps)
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out["seg"].shape == (2, 5, 64, 64)
    assert out["depth"].shape == (2, 1, 64, 64)
    assert out["cls"].shape == (2, 4)
    with torch.no_grad():
        feats = tap_features(net, x)
    assert feats[-1].shape[-2:] == (64 // stride, 64 // stride)
    if len(taps) == 2:
        assert feats[0].shape[-2:] == (16, 16)  # low-level tap at stride 4
    # Every stream has the same node shapes, so a soft mixture of parents runs.
    nu = [torch.full((3, 3), 1 / 3) for _ in range(layers - 1)]
    soft = net.forward_soft(x, nu)
    assert {k: tuple(v.shape) for k, v in soft.items()} == {
        k: tuple(v.shape) for k, v in out.items()
    }


@pytest.mark.parametrize(("name", "options"), [(c[0], c[1]) for c in CASES[::3]])
def test_batchnorm_only_in_convbnact_and_foldable(name, options):
    torch.manual_seed(0)
    net = anchor(name, options)
    for module in net.modules():
        for child in module.children():
            if isinstance(child, nn.BatchNorm2d):
                assert isinstance(module, ConvBNAct)
    # Random BN statistics, then folding must not change the eval output (batch 1: ASPP pool).
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        folded = fold_batchnorm_(copy.deepcopy(net))
        out = folded(x)
        blocks = sum(isinstance(m, ConvBNAct) for m in folded.modules())
        flat = flatten_folded(folded)
        flat_out = flat(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(flat_out[k], out[k], rtol=0, atol=0)  # the same ops
    # every block became one FoldedConv, and no block is left
    assert sum(isinstance(m, FoldedConv) for m in flat.modules()) == blocks > 0
    assert not any(isinstance(m, ConvBNAct) for m in flat.modules())


def test_a_folded_conv_is_one_conv_module_sharing_the_blocks_tensors():
    block = ConvBNAct(4, 6, 3, stride=2, groups=2, act=nn.ReLU6).eval()
    block[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        ref = block(x)
        with pytest.raises(ValueError, match="fold"):
            FoldedConv.from_block(block)  # an unfolded block would lose its BatchNorm
        block.fold_()
        flat = flatten_folded(block)  # a block itself is replaced, not changed in place
        torch.testing.assert_close(flat(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(flat, nn.Conv2d) and isinstance(flat.act, nn.ReLU6)
    assert flat.weight is block[0].weight and flat.bias is block[0].bias
    assert (flat.stride, flat.groups, flat.padding) == ((2, 2), 2, (1, 1))
    assert not flat.training and flat.weight.device.type == "cpu"


def test_aspp_batch_one_eval():
    torch.manual_seed(0)
    aspp = ASPP(16, 8, rates=(1, 2, 3)).eval()
    x = torch.randn(1, 16, 5, 7)
    with torch.no_grad():
        y = aspp(x)
        pooled = aspp.branches[-1](x)
    assert y.shape == (1, 8, 5, 7)
    assert len(aspp.branches) == 5  # 1x1, three atrous 3x3, image pooling
    torch.testing.assert_close(pooled, pooled[..., :1, :1].expand_as(pooled))
    head = DeepLabV3PlusHead(6, 16, 3, aspp_channels=8, decoder_channels=8).eval()
    with torch.no_grad():
        out = head([torch.randn(1, 6, 20, 28), x], (80, 112))
    assert out.shape == (1, 3, 80, 112)
    # And through a whole anchor net at batch 1, eval mode.
    net = anchor("mobilenetv2_deeplab", SMALL_MOBILENET).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64))["seg"].shape == (1, 5, 64, 64)


def resnet34_encoder_params() -> int:
    """Hand count: convs (no bias) + BN (gamma, beta) of stem and 3/4/6/3 basic blocks."""

    def conv(cin: int, cout: int, k: int) -> int:  # conv weight + BN gamma/beta
        return cin * cout * k * k + 2 * cout

    total = conv(3, 64, 7)
    cin = 64
    for depth, cout in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True):
        for i in range(depth):
            c = cin if i == 0 else cout
            total += conv(c, cout, 3) + conv(cout, cout, 3)
            if c != cout:
                total += conv(c, cout, 1)  # projection shortcut
        cin = cout
    return total


def mobilenetv2_feature_params() -> int:
    """Hand count from the (t, c, n, s) table: stem 3x3 conv 3->32, then per inverted residual
    [1x1 expand cin->cin*t if t > 1] + 3x3 depthwise + 1x1 project, each conv followed by BN."""
    total = 3 * 32 * 9 + 2 * 32
    cin = 32
    for t, c, n in (
        (1, 16, 1),
        (6, 24, 2),
        (6, 32, 3),
        (6, 64, 4),
        (6, 96, 3),
        (6, 160, 3),
        (6, 320, 1),
    ):
        for _ in range(n):
            h = cin * t
            total += (cin * h + 2 * h if t != 1 else 0) + (9 * h + 2 * h) + (h * c + 2 * c)
            cin = c
    return total


def test_standard_parameter_counts():
    # torchvision resnet34: 21,797,672 total, minus fc (512 * 1000 + 1000 = 513,000).
    assert resnet34_encoder_params() == 21_797_672 - 513_000 == 21_284_672
    # torchvision mobilenet_v2: 3,504,872 total, minus the classifier (1280 * 1000 + 1000)
    # and the last 1x1 ConvBN 320 -> 1280 (320 * 1280 + 2 * 1280 = 412,160).
    assert mobilenetv2_feature_params() == 3_504_872 - 1_281_000 - 412_160 == 1_811_712
    for options in ({}, {"granularity": "block"}, {"output_stride": 8}):
        bb = build_backbone(BackboneConfig(name="resnet34_deeplab", options=options), 3)
        assert n_params(bb.make_blocks()) == 21_284_672
        bb = build_backbone(BackboneConfig(name="mobilenetv2_deeplab", options=options), 3)
        assert n_params(bb.make_blocks()) == 1_811_712
    # cifar10-fast ResNet-9 without its 512 -> 10 linear layer.
    bb = build_backbone(BackboneConfig(name="resnet9"), 3)
    assert n_params(bb.make_blocks()) == 6_568_000


def test_meta_device_shapes():
    """The cost model builds and runs the anchor on the meta device."""
    with torch.device("meta"):
        net = anchor("resnet34_deeplab", {"granularity": "block"}).eval()
        x = torch.empty(1, 3, 96, 128)
        feats = tap_features(net, x)
        assert net.head(0)(feats, (96, 128)).shape == (1, 5, 96, 128)


def test_bad_options():
    from dymu.errors import ConfigError

    for name, options in [
        ("resnet34_deeplab", {"output_stride": 32}),
        ("mobilenetv2_deeplab", {"granularity": "layer"}),
        ("resnet9", {"depth": 3}),
    ]:
        with pytest.raises((ConfigError, ValueError)):
            build_backbone(BackboneConfig(name=name, options=options), 3)
