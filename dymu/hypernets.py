"""The controller: the edge hypernet h and the weight hypernet h-bar (paper §3.3, App. G).

Both take a preference ``(r, c)`` through a learned :class:`PreferenceEmbedding`
``p = sum_i r_i e_i + c e_c`` (App. G) and an MLP. They accept one preference (``r`` of shape
(N,), ``c`` a scalar) or a batch (``r`` (B, N), ``c`` (B,)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from .anchor import BNDeltas
from .architecture import Architecture, Node
from .config import WeightInput

#: What a node's deltas are a function of (:class:`dymu.config.HypernetConfig.weight_input`).
WEIGHT_INPUTS = get_args(WeightInput)


class PreferenceEmbedding(nn.Module):
    """``p = sum_i r_i e_i + c e_c`` with learned ``e_i, e_c`` in R^D (App. G)."""

    def __init__(self, n_tasks: int, dim: int = 32) -> None:
        super().__init__()
        self.task_embeddings = nn.Parameter(torch.randn(n_tasks, dim) / dim**0.5)
        self.cost_embedding = nn.Parameter(torch.randn(dim) / dim**0.5)

    def forward(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c, dtype=r.dtype, device=r.device)
        return r @ self.task_embeddings + c.unsqueeze(-1) * self.cost_embedding


def mlp(dim_in: int, hidden: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU layers of the given widths."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(dim_in, width), nn.ReLU()]
        dim_in = width
    return nn.Sequential(*layers)


def run_mlp(layers: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """``layers(h)`` for an :func:`mlp`, the same ops (bitwise), called as functions.

    The hypernets run on one preference for every switch, and on tensors this small calling
    each ``nn.Module`` costs more than its matmul: this cuts the controller's time on a
    preference switch by a quarter to a half (docs/benchmarks.md, "Issue 15, item 1: the
    controller as functions, a cheaper weights' stamp").
    """
    for layer in layers:
        h = F.linear(h, layer.weight, layer.bias) if type(layer) is nn.Linear else torch.relu(h)
    return h


class EdgeHypernet(nn.Module):
    """h(r, c; phi): logits of each child node's parent choice, one N x N head per boundary.

    Output shape (L-1, N, N) (or (B, L-1, N, N)); row ``j`` of boundary ``b`` holds child
    ``(b+1, j)``'s logits over the parents ``(b, k)`` — the alpha of Eq. (1).
    """

    def __init__(
        self, n_tasks: int, n_layers: int, embed_dim: int = 32, hidden: Sequence[int] = (100, 100)
    ) -> None:
        super().__init__()
        self.n_tasks, self.n_layers = n_tasks, n_layers
        self.embedding = PreferenceEmbedding(n_tasks, embed_dim)
        self.mlp = mlp(embed_dim, hidden)
        width = hidden[-1] if hidden else embed_dim
        self.heads = nn.ModuleList(nn.Linear(width, n_tasks * n_tasks) for _ in range(n_layers - 1))

    def forward(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = run_mlp(self.mlp, self.embedding.forward(r, c))
        n = self.n_tasks
        if not self.heads:
            return z.new_zeros(*z.shape[:-1], 0, n, n)
        logits = [F.linear(z, h.weight, h.bias).unflatten(-1, (n, n)) for h in self.heads]
        return torch.stack(logits, dim=-3)


class WeightHypernet(nn.Module):
    """h-bar(r, c; phi-bar): (dgamma, dbeta) for every BatchNorm channel of every node (§3.3.2).

    One zero-initialized linear head per node, so the deltas start at exactly zero and the
    untrained controller reproduces the anchor's weights. ``inputs="readers"`` feeds each node
    its readers' preference (:func:`readers_preference`) instead of ``(r, c)``.
    """

    def __init__(
        self,
        n_tasks: int,
        bn_layout: Sequence[tuple[tuple[int, int], Sequence[tuple[str, int]]]],
        embed_dim: int = 32,
        hidden: Sequence[int] = (100, 100, 100),
        inputs: str = "preference",
    ) -> None:
        super().__init__()
        if inputs not in WEIGHT_INPUTS:
            raise ValueError(f"inputs must be one of {WEIGHT_INPUTS}, not {inputs!r}")
        self.inputs = inputs
        self.embedding = PreferenceEmbedding(n_tasks, embed_dim)
        self.mlp = mlp(embed_dim, hidden)
        width = hidden[-1] if hidden else embed_dim
        self.layout = {node: list(bns) for node, bns in bn_layout if bns}
        self.heads = nn.ModuleDict()
        for (l, j), bns in self.layout.items():
            head = nn.Linear(width, 2 * sum(ch for _, ch in bns))
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.heads[_key(l, j)] = head

    @property
    def num_bn_channels(self) -> int:
        return sum(ch for bns in self.layout.values() for _, ch in bns)

    def features(
        self, r: torch.Tensor, c: torch.Tensor, architecture: Architecture | None = None
    ) -> torch.Tensor:
        """z, the MLP's output, from which every node's head is one linear map (§3.3.2): (D,)
        from ``(r, c)``, or with ``inputs="readers"`` (K, D), row k from the preference of
        ``architecture.reader_sets()[k]`` (:func:`readers_preference`)."""
        if self.inputs == "readers":
            if architecture is None:
                raise ValueError("a weight hypernet on the readers' preference needs the tree")
            r = readers_preference(r, architecture.reader_sets())
            c = torch.as_tensor(c, dtype=r.dtype, device=r.device).expand(len(r))
        return run_mlp(self.mlp, self.embedding.forward(r, c))

    def head(self, node: Node) -> nn.Linear:
        """Node ``(layer, stream)``'s head: z -> [dgamma; dbeta] of its BN channels."""
        return self.heads[_key(*node)]

    def forward(
        self,
        r: torch.Tensor,
        c: torch.Tensor,
        nodes: Sequence[Node] | None = None,
        architecture: Architecture | None = None,
    ) -> BNDeltas:
        """Deltas for ``nodes`` (all by default) for one preference (``r`` of shape (N,));
        ``architecture``, the tree they serve, is needed with ``inputs="readers"``."""
        if r.ndim != 1:
            raise ValueError("the weight hypernet takes one preference at a time (r of shape (N,))")
        return self.deltas(self.features(r, c, architecture), nodes, architecture)

    def deltas(
        self,
        z: torch.Tensor,
        nodes: Sequence[Node] | None = None,
        architecture: Architecture | None = None,
    ) -> BNDeltas:
        """Deltas for ``nodes`` (all by default; nodes without BN are skipped) from one
        preference's features ``z`` (:meth:`features`), per BN module by name. With features
        per reader set, nodes that ``architecture`` does not use have no readers and get none."""
        if z.ndim == 2 and architecture is None:  # one row per reader set of the tree
            raise ValueError("features per reader set need the tree they were made for")
        deltas: dict[Node, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for node in self.layout if nodes is None else nodes:
            if node not in self.layout:
                continue
            zn = z
            if z.ndim == 2:
                if (row := architecture.reader_row(*node)) is None:
                    continue
                zn = z[row]
            bns = self.layout[node]
            dgamma, dbeta = self.head(node)(zn).chunk(2)
            sizes = [ch for _, ch in bns]
            deltas[node] = {
                name: (g, b)
                for (name, _), g, b in zip(
                    bns, dgamma.split(sizes), dbeta.split(sizes), strict=True
                )
            }
        return deltas


def readers_preference(r: torch.Tensor, sets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(K, N): row k is ``r`` restricted to the tasks of ``sets[k]`` and renormalized (uniform
    over them where ``r`` gives them no weight at all).

    A node only task set S reads changes only S's losses, so of the objective sum_i r_i L_i it
    sees sum_{i in S} r_i L_i, whose minimizer depends on r_S / sum(r_S) alone: a node only task
    i reads has one best delta for every r with r_i > 0 (docs/training.md, "Deltas from the
    readers' preference").
    """
    mask = torch.zeros(len(sets), r.shape[-1], dtype=r.dtype, device=r.device)
    for k, tasks in enumerate(sets):
        mask[k, list(tasks)] = 1.0
    restricted = mask * r
    total = restricted.sum(-1, keepdim=True)
    uniform = mask / mask.sum(-1, keepdim=True)
    return torch.where(total > 0, restricted / total.clamp_min(1e-12), uniform)


def _key(layer: int, stream: int) -> str:
    return f"l{layer}_s{stream}"
