"""One sweep over every registered backbone (as timm's tests do): a new entry is tested the day
it is registered. Soft forward + backward through anchor and both hypernets, every parameter
gets a finite, non-zero gradient, all BN is foldable, and materialization matches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dymu
from dymu.anchor import BACKBONES, ConvBNAct, build_backbone
from dymu.config import BackboneConfig, ModelConfig, TaskSpec

from .conftest import randomize_

# Small widths where a backbone offers them, so the sweep stays fast on 2 CPU cores.
FAST_OPTIONS = {
    "small_resnet": {"widths": (8, 8, 12, 12, 16), "head_channels": 8},
    "resnet34_deeplab": {
        "width": 0.125,
        "aspp_channels": 16,
        "decoder_channels": 16,
        "low_level_channels": 8,
    },
    "mobilenetv2_deeplab": {
        "width_mult": 0.25,
        "aspp_channels": 16,
        "decoder_channels": 16,
        "low_level_channels": 8,
    },
    "resnet9": {"width": 0.125, "head_channels": 8},
}
TASKS = (
    TaskSpec(name="seg", kind="segmentation", classes=3),
    TaskSpec(name="normals", kind="normals"),
    TaskSpec(name="cls", kind="classification", classes=4),
)


def test_every_backbone_has_sweep_options():
    assert set(BACKBONES) == set(FAST_OPTIONS), "add the new backbone to FAST_OPTIONS"


@pytest.fixture(params=sorted(BACKBONES))
def model(request) -> dymu.ControllableModel:
    torch.manual_seed(0)
    config = ModelConfig(
        tasks=TASKS,
        input_size=(64, 64),
        backbone=BackboneConfig(name=request.param, options=FAST_OPTIONS[request.param]),
    )
    return randomize_(dymu.create_model(config), delta_scale=0.05)


def test_soft_forward_backward_reaches_every_parameter(model):
    x = torch.randn(2, 3, 64, 64)
    r, c = torch.tensor([0.5, 0.3, 0.2]), torch.tensor(0.4)
    logits = model.edge_hypernet(r, c)
    nu = list(F.gumbel_softmax(logits, tau=1.0, dim=-1))
    out = model(x, nu, model.weight_hypernet(r, c))
    assert out["seg"].shape == (2, 3, 64, 64) and out["cls"].shape == (2, 4)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert all(torch.isfinite(v).all() for v in out.values())


def test_every_batchnorm_is_foldable(model):
    for m in model.anchor.modules():
        if isinstance(m, nn.BatchNorm2d):
            pass
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.anchor.modules())
    folded = sum(isinstance(m, ConvBNAct) for m in model.anchor.modules())
    assert bns == folded, "every BatchNorm2d must sit inside a ConvBNAct"


def test_materialized_matches_soft_forward(model):
    x = torch.randn(1, 3, 64, 64)
    net = model.materialize([0.2, 0.5, 0.3], 0.6)
    arch = net.architecture
    nu = arch.one_hot_nu()
    with torch.no_grad():
        out, ref = net(x), model(x, nu, model.bn_deltas([0.2, 0.5, 0.3], 0.6))
    for k in out:
        assert (out[k] - ref[k]).abs().max() < 1e-4


def test_backbone_declares_consistent_layers():
    for name in BACKBONES:
        bb = build_backbone(BackboneConfig(name=name, options=FAST_OPTIONS[name]), 3)
        assert len(bb.make_blocks()) == bb.num_layers
        assert bb.taps[-1] == bb.num_layers - 1


def test_unknown_backbone_and_bad_options():
    with pytest.raises(dymu.ConfigError, match="unknown backbone"):
        dymu.create_model(ModelConfig(tasks=TASKS, backbone=BackboneConfig(name="vit")))
    with pytest.raises(dymu.ConfigError, match="bad options"):
        dymu.create_model(
            ModelConfig(
                tasks=TASKS, backbone=BackboneConfig(name="small_resnet", options={"depth": 3})
            )
        )
