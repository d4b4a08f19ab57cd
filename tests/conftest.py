"""Shared fixtures: tiny models whose BN statistics and hypernet heads are randomized, so that
equivalence and folding tests exercise non-trivial BN deltas and running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dymu
from dymu.config import BackboneConfig, ModelConfig, TaskSpec

TINY_OPTIONS = {"widths": (8, 8, 12, 12, 16), "strides": (2, 2, 1, 2, 1), "head_channels": 8}


def tiny_config(n_tasks: int = 3, input_size: tuple[int, int] = (24, 32), **options) -> ModelConfig:
    kinds = [
        TaskSpec(name="segmentation", kind="segmentation", classes=5),
        TaskSpec(name="depth", kind="depth", loss_scale=3.0),
        TaskSpec(name="normals", kind="normals", loss_scale=10.0),
        TaskSpec(name="label", kind="classification", classes=4),
    ]
    tasks = [
        kinds[i % len(kinds)].model_copy(update={"name": f"{kinds[i % len(kinds)].name}{i}"})
        if i >= len(kinds)
        else kinds[i]
        for i in range(n_tasks)
    ]
    return ModelConfig(
        tasks=tasks,
        input_size=input_size,
        backbone=BackboneConfig(name="small_resnet", options={**TINY_OPTIONS, **options}),
    )


@torch.no_grad()
def randomize_(
    model: dymu.ControllableModel, seed: int = 0, delta_scale: float = 0.2
) -> dymu.ControllableModel:
    """Random BN statistics/affine in the anchor and non-zero weight-hypernet heads."""
    g = torch.Generator().manual_seed(seed)
    for m in model.anchor.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    for head in model.weight_hypernet.heads.values():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * delta_scale / 10)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * delta_scale)
    for p in model.edge_hypernet.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture
def tiny_model() -> dymu.ControllableModel:
    torch.manual_seed(0)
    return randomize_(dymu.create_model(tiny_config()))


def prepared_run(tmp_path, config, stages: tuple[str, ...]):
    """``training.pipeline.prepare_run`` of ``config`` for ``stages`` on the CPU, writing under
    ``tmp_path``: a run whose stage functions a test calls itself."""
    from training.distributed import Distributed
    from training.pipeline import RunRequest, prepare_run

    request = RunRequest(
        config, tmp_path / "out", tmp_path / "run", torch.device("cpu"), Distributed(),
        resume=False, stages=stages, progress=False, command=None, max_steps=None,
    )  # fmt: skip
    run, _, _ = prepare_run(request)
    return run
