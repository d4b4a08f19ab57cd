"""The networks the cases compare: dymu trees, the N single-task streams, a hard-shared network.

Every dymu tree is built by :meth:`dymu.ControllableModel.materialize` (BN adapted and folded),
and every cost comes from the model's :class:`dymu.CostModel` (1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import dymu
from dymu.anchor import AnchorNet, check_image, fold_batchnorm_
from dymu.architecture import Architecture
from dymu.cost import Cost
from dymu.materialize import clone_module

C_VALUES = (0.0, 0.5, 1.0)


def uniform_r(n: int) -> list[float]:
    return [1.0 / n] * n


def skewed_r(n: int, top: float = 0.8) -> list[float]:
    """Most of the importance on the first task: ``(0.8, 0.1, 0.1)`` for N = 3."""
    return [top] + [(1.0 - top) / (n - 1)] * (n - 1) if n > 1 else [1.0]


@dataclass(frozen=True)
class Tree:
    """A named tree and the preference whose BN deltas it runs with."""

    name: str
    architecture: Architecture
    r: tuple[float, ...]
    c: float
    kind: str  # "hand-made" or "arg-max"


def shared_prefix(n: int, layers: int, k: int) -> Architecture:
    """Stream 0 shared by every task for the first ``k`` layer boundaries, then branched.

    ``k = 0`` is the fully branched tree (the anchor), ``k = L-1`` the fully shared one; the
    values between span the cost range in steps of one layer.
    """
    rows = [(0,) * n if b < k else tuple(range(n)) for b in range(layers - 1)]
    return Architecture.from_parents(rows, n_tasks=n, n_layers=layers)


def hand_made_trees(model: dymu.ControllableModel) -> list[Tree]:
    n, layers = model.n_tasks, model.n_layers
    names = {0: "fully branched", layers - 1: "fully shared"}
    r = tuple(uniform_r(n))
    return [
        Tree(names.get(k, f"shared to layer {k}"), shared_prefix(n, layers, k), r, 0.0, "hand-made")
        for k in range(layers - 1, -1, -1)
    ]


def argmax_trees(model: dymu.ControllableModel) -> list[Tree]:
    """The model's own trees at c = 0, 0.5, 1 for uniform and skewed r (paper Fig. 5's axes)."""
    n = model.n_tasks
    trees = []
    for label, r in (("uniform r", uniform_r(n)), ("skewed r", skewed_r(n))):
        for c in C_VALUES:
            trees.append(
                Tree(f"{label}, c={c:g}", model.architecture(r, c), tuple(r), c, "arg-max")
            )
    return trees


def materialize(model: dymu.ControllableModel, tree: Tree, **kwargs) -> dymu.MaterializedModel:
    return model.materialize(list(tree.r), tree.c, architecture=tree.architecture, **kwargs)


def single_task_nets(model: dymu.ControllableModel) -> list[dymu.MaterializedModel]:
    """The N single-task networks (each stream alone, BN folded): what a user without dymu
    deploys, run one after another."""
    branched = Architecture.fully_branched(model.n_tasks, model.n_layers)
    r = uniform_r(model.n_tasks)
    return [
        model.materialize(r, 0.0, tasks=[t], architecture=branched, adapt=False)
        for t in model.tasks
    ]


class HardSharedNet(nn.Module):
    """One encoder (stream 0's L blocks) shared by all N heads: the network PHN and PHN-BN
    serve (their hypernetworks generate its weights; the compute per image is the same).

    Not a dymu tree: a tree's top layer has one node per task, a hard-shared network has one
    node per layer. BN is folded as in a materialized tree.
    """

    def __init__(self, anchor: AnchorNet) -> None:
        super().__init__()
        self.in_channels = anchor.in_channels
        self.taps = tuple(anchor.taps)
        self.blocks = nn.ModuleList(_folded(anchor.node(l, 0)) for l in range(anchor.num_layers))
        self.heads = nn.ModuleDict(
            {name: _folded(anchor.head(j)) for j, name in enumerate(anchor.task_names)}
        )
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(x, self.in_channels)
        feats, y = [], x
        for l, block in enumerate(self.blocks):
            y = block(y)
            if l in self.taps:
                feats.append(y)
        out_hw = (x.shape[-2], x.shape[-1])
        return {name: head(feats, out_hw) for name, head in self.heads.items()}


def _folded(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        return fold_batchnorm_(clone_module(module).eval()).requires_grad_(False)


def hard_shared_cost(model: dymu.ControllableModel, hw: tuple[int, int]) -> Cost:
    """Stream 0's nodes + every head, from the model's cost table (1 MAC = 2 FLOPs)."""
    table = model.cost_model.node_costs(hw)
    flops = sum(row[0] for row in table.node_flops) + sum(table.head_flops)
    params = sum(row[0] for row in table.node_params) + sum(table.head_params)
    return Cost(flops=flops, params=params)


def distinct(trees: Sequence[Tree]) -> dict[str, list[Tree]]:
    """Trees grouped by architecture id (one timing serves every preference with that tree)."""
    groups: dict[str, list[Tree]] = {}
    for t in trees:
        groups.setdefault(t.architecture.id, []).append(t)
    return groups
