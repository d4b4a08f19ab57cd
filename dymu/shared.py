"""The hard-shared multi-task network: one backbone shared by every task, one head per task.

This is the "Multi-task network" of the paper's §4.2 and the network PHN, PHN-BN and
Controllable Pareto MTL generate weights for (``training.baselines``); the benchmarks time it
next to dymu's trees. Its blocks follow the same recipe as one anchor stream (same blocks, same
taps) and each task keeps its own head, so its cost is stream 0's nodes plus the requested heads
in dymu's one cost model (:meth:`dymu.CostModel.hard_shared_cost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from .anchor import AnchorNet, TaskHead, build_backbone, check_image, fold_batchnorm_
from .config import ModelConfig
from .cost import Cost, CostModel
from .materialize import clone_module
from .preference import check_task_names


class HardSharedNet(nn.Module):
    """``L`` shared blocks + one head per task; ``forward(x) -> {task: prediction}``.

    ``tasks`` builds only those tasks' heads (a network for a task subset). The outputs have the
    format of :class:`dymu.MaterializedModel` (the heads are :class:`~dymu.anchor.TaskHead`).
    """

    def __init__(self, config: ModelConfig, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        backbone = build_backbone(config.backbone, config.in_channels)
        wanted = config.task_names if tasks is None else tuple(tasks)
        check_task_names(wanted, config.task_names)
        self.config = config
        self.in_channels = config.in_channels
        self.taps = tuple(backbone.taps)
        self.num_layers = backbone.num_layers
        self.tasks = tuple(t for t in config.task_names if t in wanted)
        self.blocks = nn.ModuleList(backbone.make_blocks())
        self.heads = nn.ModuleDict(
            {t.name: TaskHead(t, backbone.make_head(t)) for t in config.tasks if t.name in wanted}
        )

    @classmethod
    def from_anchor(cls, anchor: AnchorNet, stream: int = 0) -> HardSharedNet:
        """Stream ``stream``'s blocks shared by every task's head, copied from a trained anchor,
        BN folded and in eval mode, like a materialized tree (the benchmarks time this one)."""
        with torch.device("meta"):
            net = cls(anchor.config)
        with torch.no_grad():
            net.blocks = nn.ModuleList(
                _folded(anchor.node(l, stream)) for l in range(anchor.num_layers)
            )
            net.heads = nn.ModuleDict(
                {name: _folded(anchor.head(j)) for j, name in enumerate(anchor.task_names)}
            )
        return net.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(x, self.in_channels)
        feats, y = [], x
        for l, block in enumerate(self.blocks):
            y = block(y)
            if l in self.taps:
                feats.append(y)
        out_hw = (x.shape[-2], x.shape[-1])
        return {name: head(feats, out_hw) for name, head in self.heads.items()}

    def cost(self, input_hw: tuple[int, int] | None = None) -> Cost:
        """Analytic FLOPs (1 multiply-add = 2 FLOPs) and unfolded params per image."""
        return shared_cost(self.config, self.tasks, input_hw)


def _folded(module: nn.Module) -> nn.Module:
    return fold_batchnorm_(clone_module(module).eval()).requires_grad_(False)


def shared_cost(
    config: ModelConfig, tasks: Sequence[str] | None = None, input_hw: tuple[int, int] | None = None
) -> Cost:
    """Cost of the hard-shared network of ``config`` with the heads of ``tasks`` (all: None)."""
    names = config.task_names if tasks is None else tuple(tasks)
    check_task_names(names, config.task_names)
    streams = [config.task_names.index(t) for t in names]
    return _cost_model(config.model_dump_json()).hard_shared_cost(input_hw, streams)


@lru_cache(maxsize=16)
def _cost_model(config_json: str) -> CostModel:
    # Baselines cost themselves once per save and per evaluation; the meta anchor behind a
    # CostModel is worth keeping per config.
    return CostModel(ModelConfig.model_validate_json(config_json))
