"""The path-table estimator of the edge stage: the exact expected loss of hard trees.

In stage 1 the anchor is frozen and its BatchNorms are in eval mode, so the prediction of task
``j`` depends on the tree only through ``j``'s own path: the stream ``a_b`` of the node it
passes at each layer ``b = 0 .. L-2`` (the top node is always ``(L-1, j)``). There are
``N^(L-1)`` such paths per task (81 for N = 3, L = 5). :func:`path_losses` measures every
path's loss once, on K training images, by running the anchor layer by layer over all path
prefixes; :func:`path_probabilities` gives the probability of each path under the tree
distribution of the edge hypernet (every child picks its parent independently, App. E), so

    E_tree[ sum_i r_i w_i L_i ] = sum_i r_i w_i sum_paths P_i(path) T[i, path]

is exact and differentiable in the logits, with no Gumbel noise and no soft mixture of
features. The soft forward of the paper (Eq. 1 with Gumbel-softmax samples) trains the
controller on blends of features that no served tree computes; on streams trained apart a blend
costs far less than the hard tree it stands for, so the controller never sees what sharing
costs (docs/results-training.md). This estimator sees exactly that cost. It is a departure from
the paper, chosen per config with ``[edge] estimator = "paths"`` (docs/training.md); it fits
small N and L (the table grows as N^(L-1)), the Gumbel estimator stays for the rest.

:func:`batched_regularizer` is the path reading of the branching regularizer
(:func:`training.branching.branching_regularizer` with ``reading="path"``) for a batch of
preferences at once; a test checks the two against each other.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dymu.anchor import AnchorNet
from dymu.config import TaskSpec

from .branching import RegularizerSwitches, layer_weight
from .tasks import task_loss

# Paths whose head runs in one call: bounds the memory of the dense heads' outputs.
_PATH_CHUNK = 9


def all_paths(n_tasks: int, n_layers: int) -> list[tuple[int, ...]]:
    """Every path ``(a_0, .., a_{L-2})`` in the order of the tables' last axis (a_0 slowest)."""
    return list(itertools.product(range(n_tasks), repeat=n_layers - 1))


def _prefix_features(anchor: AnchorNet, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """Outputs of layer L-2 for every path prefix, (N^(L-1), B, ...), and the taps below it.

    Layer b runs each of its N nodes once on all N^b prefixes of the layer below (batched), so
    a node is evaluated once per distinct input, never once per tree.
    """
    n, batch = anchor.n_tasks, x.shape[0]
    level = x.unsqueeze(0)
    taps: dict[int, Tensor] = {}
    for b in range(anchor.num_layers - 1):
        flat = level.flatten(0, 1)
        outs = [anchor.node(b, a)(flat).unflatten(0, (level.shape[0], batch)) for a in range(n)]
        level = torch.stack(outs, dim=1).flatten(0, 1)  # prefix-major: index p * N + a
        if b in anchor.taps:
            taps[b] = level
    return level, taps


def _tap_for_paths(taps: dict[int, Tensor], layer: int, n: int, n_layers: int, sl: slice) -> Tensor:
    """The layer-``layer`` feature of the paths in ``sl``: its prefix's, repeated per suffix."""
    repeat = n ** (n_layers - 2 - layer)
    index = torch.arange(sl.start, sl.stop, device=taps[layer].device) // repeat
    return taps[layer][index]


@torch.no_grad()
def path_losses(
    anchor: AnchorNet, batches: Iterable[dict[str, Tensor]], tasks: Sequence[TaskSpec]
) -> Tensor:
    """T[j, p]: task j's unscaled loss on path p (:func:`all_paths` order), image-weighted mean.

    Each batch holds ``image`` and one target per task; the anchor must be in eval mode (its BN
    statistics then do not depend on the batch, as in stage 1 and at inference).
    """
    n, layers = anchor.n_tasks, anchor.num_layers
    n_paths = n ** (layers - 1)
    sums = torch.zeros(n, n_paths, dtype=torch.float64)
    count = 0
    for batch in batches:
        x = batch["image"]
        hw = (x.shape[-2], x.shape[-1])
        level, taps = _prefix_features(anchor, x)
        for j, task in enumerate(tasks):
            for start in range(0, n_paths, _PATH_CHUNK):
                sl = slice(start, min(start + _PATH_CHUNK, n_paths))
                top = anchor.node(layers - 1, j)(level[sl].flatten(0, 1))
                feats = [
                    top if t == layers - 1 else _tap_for_paths(taps, t, n, layers, sl).flatten(0, 1)
                    for t in anchor.taps
                ]
                pred = anchor.head(j)(feats, hw).unflatten(0, (sl.stop - sl.start, x.shape[0]))
                for k in range(sl.stop - sl.start):
                    loss = task_loss(task, pred[k], batch[task.name])
                    sums[j, start + k] += float(loss) * x.shape[0]
        count += x.shape[0]
    return (sums / max(count, 1)).float()


def loss_scaled(table: Tensor, tasks: Sequence[TaskSpec]) -> Tensor:
    """w_j T[j, p]: each task's path losses times its loss scale (App. G)."""
    scales = torch.tensor([t.loss_scale for t in tasks], dtype=table.dtype, device=table.device)
    return table * scales.unsqueeze(1)


def own_path_losses(table: Tensor) -> Tensor:
    """T[j, (j, .., j)]: each task's loss on its own stream (the anchor's single-task net)."""
    n, n_paths = table.shape
    depth = 0
    while n**depth < n_paths:
        depth += 1
    own = [sum(j * n**k for k in range(depth)) for j in range(n)]
    return table[torch.arange(n), torch.tensor(own)]


def path_probabilities(probs: Tensor) -> Tensor:
    """P[..., j, p]: probability that task j's path is p, for ``probs`` of shape (..., L-1, N, N).

    ``probs[..., b, k, i]`` is the probability that child ``(b+1, k)`` picks parent ``(b, i)``.
    Task j's top node ``(L-1, j)`` picks ``a_{L-2}``, node ``(L-2, a_{L-2})`` picks ``a_{L-3}``,
    and so on: P = probs[L-2][j, a_{L-2}] * prod_b probs[b][a_{b+1}, a_b] (App. E's independent
    parent choices).
    """
    n_bounds, n = probs.shape[-3], probs.shape[-1]
    lead = probs.shape[:-3]
    if n_bounds == 0:
        return probs.new_ones(*lead, n, 1)
    out = probs[..., n_bounds - 1, :, :].unsqueeze(-1)  # (..., j, a_{L-2}, rest=1)
    for b in range(n_bounds - 2, -1, -1):
        step = probs[..., b, :, :].transpose(-1, -2)  # [a_b, a_{b+1}]
        # new[..., j, a_b, a_{b+1}, rest] = out[..., j, a_{b+1}, rest] * probs[b][a_{b+1}, a_b]
        out = (out.unsqueeze(-3) * step.unsqueeze(-3).unsqueeze(-1)).flatten(-2, -1)
    return out.flatten(-2, -1)


def expected_task_losses(probs: Tensor, table: Tensor) -> Tensor:
    """E_tree[L_j] for each task: (..., N) from ``probs`` (..., L-1, N, N) and T (N, N^(L-1))."""
    return (path_probabilities(probs) * table.to(probs)).sum(-1)


def merge_probabilities(probs: Tensor) -> Tensor:
    """M[..., i, j, b]: P(the paths of tasks i and j pass the same node of layer b), b < L-1.

    The batched form of :func:`training.branching.merge_probability` for every pair at once: a
    joint chain over the pair of nodes the two paths occupy, walked top down.
    """
    n_bounds, n = probs.shape[-3], probs.shape[-1]
    lead = probs.shape[:-3]
    eye = torch.eye(n, dtype=probs.dtype, device=probs.device)
    joint = (eye[:, None, :, None] * eye[None, :, None, :]).expand(*lead, n, n, n, n)
    merged: list[Tensor] = []
    for b in range(n_bounds - 1, -1, -1):
        nu = probs[..., b, :, :]
        together = joint.diagonal(dim1=-2, dim2=-1)  # (..., i, j, x)
        apart = joint - torch.diag_embed(together)
        joint = torch.einsum("...xa,...ijxy,...yc->...ijac", nu, apart, nu)
        joint = joint + torch.diag_embed(torch.einsum("...ijx,...xa->...ija", together, nu))
        merged.append(joint.diagonal(dim1=-2, dim2=-1).sum(-1))
    return torch.stack(list(reversed(merged)), dim=-1)


def active_mask(r: Tensor, tau: float, dichotomy: bool = True) -> Tensor:
    """Active tasks {i : r_i >= tau} per preference; the arg-max task when none is (§3.3.1)."""
    if not dichotomy:
        return torch.ones_like(r, dtype=torch.bool)
    active = r >= tau
    top = torch.nn.functional.one_hot(r.argmax(-1), r.shape[-1]).bool()
    return torch.where(active.any(-1, keepdim=True), active, top)


def batched_regularizer(
    probs: Tensor,
    r: Tensor,
    c: Tensor,
    affinity: Tensor | None,
    tau: float,
    lambda_active: float = 1.0,
    lambda_inactive: float = 0.1,
    switches: RegularizerSwitches | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Omega, L_active, L_inactive per preference (path reading; probs (B, L-1, N, N)).

    L_active = sum_l sum_{i != j in A} (L-l)/L A(i, j) 2 (1 - m_ij^l) and
    L_inactive = sum_l sum_{j in I} min_{i in A} 2 (1 - m_ji^l) (docs/training.md), and
    Omega = c lambda_A L_active + lambda_I L_inactive (§3.3.1).
    """
    switches = switches or RegularizerSwitches()
    apart = 2 * (1 - merge_probabilities(probs))  # (B, N, N, L-1)
    active = active_mask(r, tau, switches.dichotomy)
    l_active, l_inactive = regularizer_terms(apart, active, affinity, switches)
    omega = c * lambda_active * l_active + lambda_inactive * l_inactive
    return omega, l_active, l_inactive


def regularizer_terms(
    apart: Tensor, active: Tensor, affinity: Tensor | None, switches: RegularizerSwitches
) -> tuple[Tensor, Tensor]:
    """L_active and L_inactive from ``apart`` = 2 (1 - m_ij^l), (..., N, N, L-1), and the active
    set (..., N) (broadcast against each other): the two sums of Eq. 3 and 5, path reading."""
    n_bounds, n = apart.shape[-1], apart.shape[-2]
    weights = apart.new_tensor(
        [layer_weight(b, n_bounds + 1, switches.layer_weighting) for b in range(n_bounds)]
    )
    eye = torch.eye(n, dtype=torch.bool, device=apart.device)
    pairs = (active.unsqueeze(-1) & active.unsqueeze(-2) & ~eye).to(apart)
    if affinity is not None and switches.affinity:
        pairs = pairs * affinity.to(apart)
    l_active = (pairs * (apart * weights).sum(-1)).sum((-1, -2))
    to_active = apart.masked_fill(~active.unsqueeze(-2).unsqueeze(-1), float("inf")).amin(dim=-2)
    inactive = (~active).expand(to_active.shape[:-1])
    l_inactive = torch.where(inactive, to_active.sum(-1), torch.zeros(())).sum(-1)
    if not switches.inactive_loss:
        l_inactive = torch.zeros_like(l_inactive)
    return l_active, l_inactive
