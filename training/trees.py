"""The tree-table estimator of the edge stage: each preference's best hard tree, then a fit.

With the path table T (training/paths.py) the edge objective of stage 1 (paper Eq. 2 with the
branching regularizer Omega of Eq. 3-6) can be evaluated exactly on every hard tree: task j's
loss on a tree is T[j, its path], and on a hard tree the merge indicators m_ij^l are 0 or 1.
For small N and L the hard trees are few (26,325 for N = 3, L = 5; 80 for N = 2, L = 5), so for
any (r, c) the tree that minimizes

    sum_i r_i w_i T[i, path_i(tree)] + c lambda_A L_active(tree) + lambda_I L_inactive(tree)

is found by one matrix product. The objective is multilinear in the parent distributions of
the relaxed problem (the path estimator's), so this hard tree is also the relaxed problem's
global optimum; the path estimator's gradient descent through one shared hypernet converges
instead to one tree for most of the simplex (docs/results-training.md). The stage therefore
fits the edge hypernet to these optima by cross-entropy on the parent choices of the nodes each
tree uses: the hypernet learns the map (r, c) -> best tree, and its arg-max is what inference
serves. A departure from the paper's training of the controller (docs/training.md, "The
tree-table estimator"), not from its objective.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from dymu.errors import ConfigError
from dymu.preference import sample_preferences

from .branching import RegularizerSwitches
from .paths import active_mask, regularizer_terms

#: Enumeration stops beyond this many trees: the estimator is for small N and L.
MAX_TREES = 500_000

#: Dense preferences (r ~ Dir(1)) on which ``pull_scale = "table"`` measures the sharing pull.
PULL_PREFERENCES = 4096


class TooManyTreesError(ConfigError):
    """The tree space of (N, L) is too large to enumerate (a config error: choose another
    estimator)."""


def hard_trees(n_tasks: int, n_layers: int) -> Tensor:
    """Every hard tree as its tasks' paths: (K, N, L-1), ``[k, j, b]`` = stream of task j's node
    at layer b (the top node is ``(L-1, j)``). Built top down: at each boundary every used child
    picks one of the N parents, so a node is shared exactly when two paths meet on it."""
    trees: list[dict[int, tuple[int, ...]]] = [{j: () for j in range(n_tasks)}]
    for _ in range(n_layers - 1):
        grown: list[dict[int, tuple[int, ...]]] = []
        for tails in trees:
            # tails[j]: task j's path from this layer up; it passes node path[0] (its top: j)
            children = sorted({path[0] if path else j for j, path in tails.items()})
            for choice in itertools.product(range(n_tasks), repeat=len(children)):
                pick = dict(zip(children, choice, strict=True))
                grown.append(
                    {j: (pick[path[0] if path else j], *path) for j, path in tails.items()}
                )
            if len(grown) > MAX_TREES:
                raise TooManyTreesError(
                    f"more than {MAX_TREES} hard trees for N = {n_tasks}, L = {n_layers}: use "
                    'estimator = "paths" or "gumbel"'
                )
        trees = grown
    return torch.tensor([[tails[j] for j in range(n_tasks)] for tails in trees], dtype=torch.long)


def path_index(paths: Tensor, n_tasks: int) -> Tensor:
    """Column of each path ``(a_0, .., a_{L-2})`` in the path table (a_0 slowest)."""
    n_bounds = paths.shape[-1]
    radix = n_tasks ** torch.arange(n_bounds - 1, -1, -1, device=paths.device)
    return (paths * radix).sum(-1)


def tree_parents(trees: Tensor) -> tuple[Tensor, Tensor]:
    """Parent choices (K, L-1, N) and the used-child mask (K, L-1, N) of every tree.

    ``parents[k, b, s]`` is the parent stream of child ``(b+1, s)``, the hypernet's target for
    row s of boundary b; children that no task passes are not part of the tree (mask False) and
    keep their own stream.
    """
    k, n, n_bounds = trees.shape
    parents = torch.arange(n).expand(k, n_bounds, n).clone()
    used = torch.zeros(k, n_bounds, n, dtype=torch.bool)
    rows = torch.arange(k)
    for j in range(n):
        child = torch.full((k,), j)  # the top node (L-1, j)
        for b in range(n_bounds - 1, -1, -1):
            parents[rows, b, child] = trees[:, j, b]
            used[rows, b, child] = True
            child = trees[:, j, b]
    return parents, used


@dataclass(frozen=True)
class TreeTable:
    """Every hard tree's terms of the edge objective, for the best-tree search of a step.

    ``task_losses`` (K, N) = w_j T[j, path_j]; ``active_terms`` and ``inactive_terms`` (2^N, K)
    hold L_active and L_inactive for each active set (row = sum_j active_j 2^j).
    """

    parents: Tensor
    used: Tensor
    task_losses: Tensor
    active_terms: Tensor
    inactive_terms: Tensor
    tau: float
    switches: RegularizerSwitches

    @classmethod
    def build(
        cls,
        table: Tensor,
        n_layers: int,
        affinity: Tensor | None,
        tau: float,
        switches: RegularizerSwitches,
    ) -> TreeTable:
        """The terms of every tree of (N, L) from the scaled path table ``table`` (N, N^(L-1))."""
        n = table.shape[0]
        trees = hard_trees(n, n_layers)
        losses = table.double().cpu()[torch.arange(n), path_index(trees, n)]
        same = trees.unsqueeze(2) == trees.unsqueeze(1)  # (K, N, N, L-1)
        apart = 2 * (1 - same.double())
        sets = torch.tensor(list(itertools.product([False, True], repeat=n))).flip(-1)
        aff = affinity.double().cpu() if affinity is not None else None
        l_act, l_inact = regularizer_terms(apart.unsqueeze(1), sets, aff, switches)
        parents, used = tree_parents(trees)
        return cls(parents, used, losses, l_act.T, l_inact.T, tau, switches)

    def _terms(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, K) each: the task term r . w T, L_active and L_inactive of every tree, the last
        two for each preference's active set (r (B, N), float64 on the CPU)."""
        active = active_mask(r, self.tau, self.switches.dichotomy)
        code = (active.long() * 2 ** torch.arange(r.shape[-1])).sum(-1)
        return r @ self.task_losses.T, self.active_terms[code], self.inactive_terms[code]

    def objective(
        self, r: Tensor, c: Tensor, lambda_active: float, lambda_inactive: float
    ) -> Tensor:
        """(B, K): the edge objective of every tree for each preference (r (B, N), c (B,))."""
        task, l_act, l_inact = self._terms(r.double().cpu())
        return (
            task
            + c.double().cpu().unsqueeze(-1) * lambda_active * l_act
            + lambda_inactive * l_inact
        )

    def sharing_pull(self, r: Tensor, lambda_inactive: float) -> Tensor:
        """(B,): for each preference, the least pull t = c lambda_A from which the objective's
        best tree is one of the most shared trees (the least L_active for r's active set).

        Tree k beats the best most-shared tree s while base_k + t L_k < base_s + t L_s, i.e.
        for t < (base_s - base_k) / (L_k - L_s); the pull is the largest such crossing (0 when
        a most-shared tree is already best at t = 0).
        """
        task, l_act, l_inact = self._terms(r.double().cpu())
        base = task + lambda_inactive * l_inact
        least = l_act.min(-1, keepdim=True).values
        most_shared = l_act <= least + 1e-12
        goal = base.masked_fill(~most_shared, float("inf")).min(-1, keepdim=True).values
        crossing = ((goal - base) / (l_act - least).masked_fill(most_shared, 1.0)).masked_fill(
            most_shared, 0.0
        )
        return crossing.clamp_min(0.0).max(-1).values

    def best(self, r: Tensor, c: Tensor, lambda_active: float, lambda_inactive: float) -> Tensor:
        """(B,): the index of each preference's best tree (the objective's arg-min)."""
        return self.objective(r, c, lambda_active, lambda_inactive).argmin(-1)


def full_sharing_pull(
    table: TreeTable, lambda_inactive: float, seed: int, count: int = PULL_PREFERENCES
) -> float:
    """The pull c lambda_A from which the most shared trees are best at every one of ``count``
    dense preferences r ~ Dir(1) (seeded): ``pull_scale = "table"``'s unit of lambda_A, so that
    c = 1 with lambda_A = 1 buys all the sharing the table offers and c spans the whole trade
    (docs/training.md, "A pull in the table's units")."""
    n = table.task_losses.shape[1]
    r = torch.tensor([r for r, _ in sample_preferences(n, count, seed)], dtype=torch.float64)
    return float(table.sharing_pull(r, lambda_inactive).max())
