"""The hard-shared multi-task network every baseline is built on, and its analytic cost.

One stream of the config's backbone (the same recipe as an anchor stream: same blocks, same
taps) is shared by all tasks, and each task has its own head (the anchor's head for that task).
This is the "Multi-task network" of the paper's §4.2 (all tasks share the backbone, separate
task-specific heads at the end). Its cost is counted like dymu's trees (:mod:`dymu.cost`):
conv/linear multiply-adds x 2 per image, on a ``meta`` copy, so no weights or compute are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from dymu.anchor import TaskHead, build_backbone, check_image
from dymu.config import ModelConfig
from dymu.cost import Cost, forward_cost


class HardSharedNet(nn.Module):
    """``L`` shared blocks + one head per task; ``forward(x) -> {task: prediction}``.

    ``tasks`` builds only those tasks' heads (a materialized network for a task subset). The
    outputs have the format of :class:`dymu.MaterializedModel` (heads are :class:`TaskHead`).
    """

    def __init__(self, config: ModelConfig, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        backbone = build_backbone(config.backbone, config.in_channels)
        self.config = config
        self.in_channels = config.in_channels
        self.taps = tuple(backbone.taps)
        self.num_layers = backbone.num_layers
        wanted = config.task_names if tasks is None else tuple(tasks)
        self.tasks = tuple(t for t in config.task_names if t in wanted)
        self.blocks = nn.ModuleList(backbone.make_blocks())
        self.heads = nn.ModuleDict(
            {t.name: TaskHead(t, backbone.make_head(t)) for t in config.tasks if t.name in wanted}
        )

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


def shared_cost(
    config: ModelConfig, tasks: Sequence[str] | None = None, input_hw: tuple[int, int] | None = None
) -> Cost:
    """Cost of the hard-shared network of ``config`` with the heads of ``tasks`` (all: None)."""
    hw = tuple(config.input_size if input_hw is None else input_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"input_hw must be (H, W) with H, W >= 1, got {hw}")
    names = config.task_names if tasks is None else tuple(tasks)
    return _shared_cost(config.model_dump_json(), names, (int(hw[0]), int(hw[1])))


@lru_cache(maxsize=64)
def _shared_cost(config_json: str, tasks: tuple[str, ...], hw: tuple[int, int]) -> Cost:
    config = ModelConfig.model_validate_json(config_json)
    with torch.device("meta"):
        net = HardSharedNet(config, tasks).eval()
    x = torch.empty(1, config.in_channels, *hw, device="meta")
    with torch.no_grad():
        cost, _ = forward_cost(net, x)
    return cost
