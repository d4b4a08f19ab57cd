"""The materialized model: the tree for one preference, as a plain inference module.

Only the used nodes are kept (each a copy of the anchor's block, with the weight hypernet's BN
deltas added to gamma and beta and BN folded into the preceding conv); they run once each, in
topological (layer) order, and a parent's output is reused by all its children. Each requested
head reads its tap features from its own path through the tree. Its outputs equal the anchor's
soft forward with one-hot ``nu`` and the same deltas (tested to 1e-4 in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .anchor import AnchorNet, BNDeltas, check_image, fold_batchnorm_
from .architecture import Architecture, Node
from .cost import Cost, CostModel
from .preference import Preference


def _key(layer: int, stream: int) -> str:
    return f"l{layer}_s{stream}"


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own tensors and no hooks, much faster than deepcopy.

    ``copy.deepcopy`` walks every attribute of every submodule in Python (about 70 % of the
    materialization time of the default model); this copies the module objects shallowly and
    clones only the parameter and buffer tensors. Containers are copied so that nothing done
    to the clone (hooks, new submodules) reaches the anchor.
    """
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)()
        elif isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    new._parameters = {
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
        for k, p in module._parameters.items()
    }
    new._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return new


@torch.no_grad()
def _adapted_copy(module: nn.Module, deltas: dict | None, fold_bn: bool) -> nn.Module:
    module = clone_module(module).eval()
    for name, (dgamma, dbeta) in (deltas or {}).items():
        bn = module.get_submodule(name)
        bn.weight.add_(dgamma.to(bn.weight))
        bn.bias.add_(dbeta.to(bn.bias))
    if fold_bn:
        fold_batchnorm_(module)
    return module.requires_grad_(False)


class MaterializedModel(nn.Module):
    """The tree-structured sub-network of one preference; ``forward(x) -> {task: tensor}``."""

    def __init__(
        self,
        anchor: AnchorNet,
        architecture: Architecture,
        tasks: Sequence[int],
        cost_model: CostModel,
        bn_deltas: BNDeltas | None = None,
        fold_bn: bool = True,
        preference: Preference | None = None,
    ) -> None:
        super().__init__()
        if (architecture.n_tasks, architecture.n_layers) != (anchor.n_tasks, anchor.num_layers):
            raise ValueError("architecture does not fit the anchor net")
        self.architecture = architecture
        self.preference = preference
        self.task_indices = tuple(sorted(tasks))
        self.tasks = tuple(anchor.task_names[j] for j in self.task_indices)
        self.in_channels = anchor.in_channels
        self.bn_folded = fold_bn
        self._cost_model = cost_model
        used = architecture.used_nodes(self.task_indices)
        deltas = bn_deltas or {}

        self.nodes = nn.ModuleDict()
        # (node, parent node or None for the image), in topological order.
        self._plan: list[tuple[Node, Node | None]] = []
        for layer, streams in enumerate(used):
            for j in streams:
                self.nodes[_key(layer, j)] = _adapted_copy(
                    anchor.node(layer, j), deltas.get((layer, j)), fold_bn
                )
                parent = None if layer == 0 else (layer - 1, architecture.parent(layer, j))
                self._plan.append(((layer, j), parent))

        self.heads = nn.ModuleDict()
        self._head_taps: list[tuple[str, list[Node]]] = []
        for j in used[-1]:
            name = anchor.task_names[j]
            self.heads[name] = _adapted_copy(anchor.head(j), None, fold_bn)
            self._head_taps.append((name, [(t, architecture.ancestor(t, j)) for t in anchor.taps]))

        # Drop each intermediate output after its last reader, so peak memory follows the tree.
        tapped = {n for _, nodes in self._head_taps for n in nodes}
        last_use: dict[Node, int] = {}
        for step, (_, parent) in enumerate(self._plan):
            if parent is not None:
                last_use[parent] = step
        self._free_after: list[list[Node]] = [[] for _ in self._plan]
        for node, step in last_use.items():
            if node not in tapped:
                self._free_after[step].append(node)
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(x, self.in_channels)
        outs: dict[Node, torch.Tensor] = {}
        for step, (node, parent) in enumerate(self._plan):
            outs[node] = self.nodes[_key(*node)](x if parent is None else outs[parent])
            for done in self._free_after[step]:
                del outs[done]
        out_hw = (x.shape[-2], x.shape[-1])
        return {
            name: self.heads[name]([outs[n] for n in taps], out_hw)
            for name, taps in self._head_taps
        }

    def cost(self, input_hw: tuple[int, int] | None = None) -> Cost:
        """Analytic FLOPs and params of this tree per image at ``input_hw`` (model size default)."""
        return self._cost_model.architecture_cost(self.architecture, input_hw, self.task_indices)

    @property
    def num_nodes(self) -> int:
        return len(self._plan)

    def extra_repr(self) -> str:
        return (
            f"tasks={self.tasks}, architecture={self.architecture.id}, bn_folded={self.bn_folded}"
        )
