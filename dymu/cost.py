"""Analytic compute cost of a tree: FLOPs and active params (docs/design.md §3).

Convention, everywhere a FLOP figure appears in dymu: **one multiply-add = 2 FLOPs**, counted for
convolutions and linear layers only, per image (batch 1), without bias additions. This is what
``torch.utils.flop_counter.FlopCounterMode`` counts for ``aten.convolution`` and ``aten.addmm``/
``aten.mm``, and the test suite checks that the two agree exactly on materialized models.
Elementwise ops, BatchNorm (folded at inference anyway), pooling, bilinear resizing and
normal-vector normalization are counted by neither; they are a few percent of a conv net's time.

Params are the *anchor* parameters of the used nodes and requested heads (conv/linear weights and
biases, BN gamma/beta), i.e. the usual count of the unfolded network. Folding BN into a conv
removes gamma/beta and adds a conv bias, so a folded module holds slightly fewer numbers.

Cost(tree) = sum over layers of sum over used nodes of cost(node) + sum over requested heads.
Per-node figures depend only on the configuration and the input size, so they are computed once
per input size from a shape-only (``meta`` device) copy of the anchor net and cached.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .anchor import AnchorNet
from .architecture import Architecture
from .config import ModelConfig


@dataclass(frozen=True)
class Cost:
    """FLOPs (1 multiply-add = 2 FLOPs) and params of one forward pass of one image."""

    flops: int
    params: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.params + other.params)

    def fraction_of(self, other: Cost) -> float:
        """FLOPs as a fraction of ``other``'s (e.g. of the full anchor net)."""
        return self.flops / other.flops if other.flops else math.nan

    def to_dict(self) -> dict[str, float | int]:
        return {"flops": self.flops, "gflops": self.gflops, "params": self.params}


def conv2d_flops(conv: nn.Conv2d, output_shape: torch.Size) -> int:
    """2 * Cout * (Cin / groups) * kh * kw * Hout * Wout * batch."""
    cout, cin_per_group, kh, kw = conv.weight.shape
    batch, _, hout, wout = output_shape
    return 2 * batch * cout * cin_per_group * kh * kw * hout * wout


def linear_flops(linear: nn.Linear, output_shape: torch.Size) -> int:
    """2 * in_features * out_features * rows."""
    rows = math.prod(output_shape[:-1])
    return 2 * linear.in_features * linear.out_features * rows


class _FlopCounter:
    """Forward hooks summing :func:`conv2d_flops` / :func:`linear_flops` over a module."""

    def __init__(self, module: nn.Module) -> None:
        self.flops = 0
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in module.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            self.flops += conv2d_flops(module, output.shape)
        else:
            self.flops += linear_flops(module, output.shape)

    def __enter__(self) -> _FlopCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_cost(module: nn.Module, *args: Any) -> tuple[Cost, Any]:
    """``(Cost, output)`` of one call ``module(*args)``: the conv/linear FLOPs of that call,
    counted by forward hooks (:func:`conv2d_flops`, :func:`linear_flops`), and the params of
    ``module``. Run it on a ``meta`` device copy to count without weights or compute."""
    with _FlopCounter(module) as counter:
        out = module(*args)
    return Cost(flops=counter.flops, params=count_params(module)), out


@dataclass(frozen=True)
class NodeCosts:
    """Per-node and per-head cost tables at one input size (``[layer][stream]``)."""

    input_hw: tuple[int, int]
    node_flops: tuple[tuple[int, ...], ...]
    node_params: tuple[tuple[int, ...], ...]
    head_flops: tuple[int, ...]
    head_params: tuple[int, ...]


class CostModel:
    """The one cost model of dymu: analytic FLOPs and params of any tree, task subset and size."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        with torch.device("meta"):
            self._anchor = AnchorNet(config).eval()
        # Hooks on the shared meta anchor would count twice if two threads measured at once.
        self._lock = threading.Lock()
        self._node_costs = lru_cache(maxsize=32)(self._compute_node_costs)

    @property
    def n_tasks(self) -> int:
        return self._anchor.n_tasks

    @property
    def n_layers(self) -> int:
        return self._anchor.num_layers

    def node_costs(self, input_hw: tuple[int, int] | None = None) -> NodeCosts:
        hw = tuple(self.config.input_size if input_hw is None else input_hw)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"input_hw must be (H, W) with H, W >= 1, got {hw}")
        return self._node_costs((int(hw[0]), int(hw[1])))

    def _compute_node_costs(self, hw: tuple[int, int]) -> NodeCosts:
        with self._lock, torch.no_grad():
            return self._measure(hw)

    def _measure(self, hw: tuple[int, int]) -> NodeCosts:
        anchor = self._anchor
        flops = [[0] * anchor.n_tasks for _ in range(anchor.num_layers)]
        params = [[0] * anchor.n_tasks for _ in range(anchor.num_layers)]
        head_flops, head_params = [], []
        for j in range(anchor.n_tasks):
            y = torch.empty(1, anchor.in_channels, *hw, device="meta")
            feats = []
            for l in range(anchor.num_layers):
                cost, y = forward_cost(anchor.node(l, j), y)
                flops[l][j], params[l][j] = cost.flops, cost.params
                if l in anchor.taps:
                    feats.append(y)
            cost, _ = forward_cost(anchor.head(j), feats, hw)
            head_flops.append(cost.flops)
            head_params.append(cost.params)
        return NodeCosts(
            hw,
            tuple(map(tuple, flops)),
            tuple(map(tuple, params)),
            tuple(head_flops),
            tuple(head_params),
        )

    def architecture_cost(
        self,
        architecture: Architecture,
        input_hw: tuple[int, int] | None = None,
        tasks: Iterable[int] | None = None,
    ) -> Cost:
        """Cost of running ``architecture`` for ``tasks`` (stream indices; all by default)."""
        if (architecture.n_tasks, architecture.n_layers) != (self.n_tasks, self.n_layers):
            raise ValueError(
                f"architecture is N={architecture.n_tasks}, L={architecture.n_layers};"
                f" the model is N={self.n_tasks}, L={self.n_layers}"
            )
        table = self.node_costs(input_hw)
        used = architecture.used_nodes(tasks)
        flops = sum(table.node_flops[l][j] for l, layer in enumerate(used) for j in layer)
        params = sum(table.node_params[l][j] for l, layer in enumerate(used) for j in layer)
        flops += sum(table.head_flops[j] for j in used[-1])
        params += sum(table.head_params[j] for j in used[-1])
        return Cost(flops=flops, params=params)

    def hard_shared_cost(
        self, input_hw: tuple[int, int] | None = None, tasks: Iterable[int] | None = None
    ) -> Cost:
        """Cost of the hard-shared network (:class:`dymu.shared.HardSharedNet`): one stream's
        nodes, which every task reads, plus the heads of ``tasks`` (all by default). Not a tree:
        a tree's top layer has one node per task, this network has one node per layer."""
        table = self.node_costs(input_hw)
        heads = range(self.n_tasks) if tasks is None else sorted(set(tasks))
        flops = sum(row[0] for row in table.node_flops)
        params = sum(row[0] for row in table.node_params)
        flops += sum(table.head_flops[j] for j in heads)
        params += sum(table.head_params[j] for j in heads)
        return Cost(flops=flops, params=params)

    def anchor_cost(
        self, input_hw: tuple[int, int] | None = None, tasks: Iterable[int] | None = None
    ) -> Cost:
        """Cost of the full anchor net (every stream alone: the fully branched tree)."""
        return self.architecture_cost(
            Architecture.fully_branched(self.n_tasks, self.n_layers), input_hw, tasks
        )
