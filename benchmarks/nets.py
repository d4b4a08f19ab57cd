"""The networks the cases compare: dymu trees, the N single-task streams, a hard-shared network.

Every dymu tree is built by :meth:`dymu.ControllableModel.materialize` (BN adapted and folded),
and every cost comes from the model's :class:`dymu.CostModel` (1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dymu
from dymu.architecture import Architecture

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


def distinct(trees: Sequence[Tree]) -> dict[str, list[Tree]]:
    """Trees grouped by architecture id (one timing serves every preference with that tree)."""
    groups: dict[str, list[Tree]] = {}
    for t in trees:
        groups.setdefault(t.architecture.id, []).append(t)
    return groups
