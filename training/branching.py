"""The edge hypernet's training signal: preference sampling, P_use, the branching regularizer,
and the RSA task affinity (paper §3.3.1, App. D, E; docs/design.md §4, §7).

Shapes: ``probs`` is a list of L-1 tensors (N, N) — ``probs[b][k, i]`` is the probability that
child node ``(b+1, k)`` picks parent ``(b, i)`` (softmax of the edge hypernet's logits; layers
0-based as everywhere in dymu). The paper's 1-based child layer index is ``l = b + 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RegularizerSwitches:
    """Ingredients of the branching regularizer, each switchable for the ablation (Table 6)."""

    inactive_loss: bool = True
    layer_weighting: bool = True
    affinity: bool = True
    dichotomy: bool = True


#: tau = ACTIVE_SHARE / N: a task is active when its preference is at least ACTIVE_SHARE times the
#: uniform preference 1 / N (docs/design.md, "The branching regularizer").
ACTIVE_SHARE = 0.6


def default_tau(n_tasks: int) -> float:
    """The threshold of the task dichotomy when ``[edge] tau`` is unset: 0.6 / N."""
    return ACTIVE_SHARE / n_tasks


def gumbel_temperature(
    step: int, start: float = 5.0, decay: float = 0.97, every: int = 300
) -> float:
    """zeta starts at 5 and is multiplied by 0.97 every 300 steps (App. G)."""
    return start * decay ** (step // every)


def task_dichotomy(
    r: torch.Tensor, tau: float, enabled: bool = True
) -> tuple[list[int], list[int]]:
    """Active tasks A = {i : r_i >= tau}, inactive I = the rest (§3.3.1).

    If A would be empty, the arg-max task is active. With the dichotomy switched off (the
    ablation "all tasks active"), every task is active and I is empty.
    """
    n = r.shape[-1]
    if not enabled:
        return list(range(n)), []
    active = [i for i in range(n) if float(r[i]) >= tau]
    if not active:
        active = [int(r.argmax())]
    return active, [i for i in range(n) if i not in active]


def usage_probability(
    probs: Sequence[torch.Tensor], tasks: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """P_use(l, i): probability that node (l, i) is in the sampled tree (App. E, Eq. 9).

    Top down: P_use(L-1, i) = 1 for requested tasks (all by default), else 0;
    P_use(l-1, i) = 1 - prod_k (1 - P_use(l, k) * nu_k^l(i)). Returns L tensors of shape (N,).
    """
    n = probs[0].shape[-1] if probs else 0
    top = torch.zeros(n) if probs else torch.zeros(0)
    if probs:
        top = top.to(probs[0])
        top[list(range(n)) if tasks is None else list(tasks)] = 1.0
    use = [top]
    for nu in reversed(probs):
        use.append(1.0 - torch.prod(1.0 - use[-1].unsqueeze(1) * nu, dim=0))
    return list(reversed(use))


def _pair_distance(nu: torch.Tensor) -> torch.Tensor:
    """||nu_i - nu_j||^2 for all children pairs: (N, N)."""
    diff = nu.unsqueeze(1) - nu.unsqueeze(0)
    return diff.pow(2).sum(-1)


def layer_weight(b: int, n_layers: int, enabled: bool = True) -> float:
    """(L - l) / L for the boundary into child layer l = b + 2 (1-based), favouring low sharing."""
    return (n_layers - (b + 2)) / n_layers if enabled else 1.0


def active_loss(
    probs: Sequence[torch.Tensor],
    use: Sequence[torch.Tensor],
    active: Sequence[int],
    affinity: torch.Tensor | None,
    switches: RegularizerSwitches = RegularizerSwitches(),
) -> torch.Tensor:
    """L_active = sum_l sum_{i!=j in A} (L-l)/L A(i,j) P_use(l,i) P_use(l,j) ||nu_i^l - nu_j^l||^2.

    Pulls the parent distributions of similar active tasks together (sharing) where both
    children are likely to exist. The usage factor uses the *children's* P_use (docs/design.md §7).
    """
    n_layers = len(probs) + 1
    idx = torch.tensor(sorted(active), dtype=torch.long)
    total = probs[0].new_zeros(()) if probs else torch.zeros(())
    if len(idx) < 2:
        return total
    aff = affinity if (affinity is not None and switches.affinity) else None
    off_diag = 1.0 - torch.eye(len(idx), dtype=total.dtype, device=total.device)
    for b, nu in enumerate(probs):
        p = use[b + 1][idx]
        pair = _pair_distance(nu[idx]) * p.unsqueeze(1) * p.unsqueeze(0) * off_diag
        if aff is not None:
            pair = pair * aff.to(pair)[idx][:, idx]
        total = total + layer_weight(b, n_layers, switches.layer_weighting) * pair.sum()
    return total


def inactive_loss(
    probs: Sequence[torch.Tensor], active: Sequence[int], inactive: Sequence[int]
) -> torch.Tensor:
    """L_inactive = sum_l sum_{j in I} min_{i in A} ||nu_i^l - nu_j^l||^2 (§3.3.1).

    Makes each inactive task's path copy some active task's path, so it adds no nodes.
    """
    total = probs[0].new_zeros(()) if probs else torch.zeros(())
    if not inactive or not active:
        return total
    a = torch.tensor(sorted(active), dtype=torch.long)
    i = torch.tensor(sorted(inactive), dtype=torch.long)
    for nu in probs:
        dist = _pair_distance(nu)[i][:, a]  # (|I|, |A|)
        total = total + dist.min(dim=1).values.sum()
    return total


def merge_probability(probs: Sequence[torch.Tensor], i: int, j: int) -> list[torch.Tensor]:
    """P(the paths of tasks i and j pass through the same node of layer b), b = 0..L-2.

    Exact for the tree distribution in which every child picks its parent independently: a
    joint Markov chain over the pair of nodes (a, b) the two paths occupy, walked top down from
    (i, j). Apart, the two children choose independently (J' = P^T J P); merged, they share one
    choice and stay merged (J'[x, x] += sum_a J[a, a] P[a, x]).
    """
    n = probs[0].shape[-1]
    joint = probs[0].new_zeros(n, n)
    joint[i, j] = 1.0
    merged: list[torch.Tensor] = []
    for nu in reversed(probs):
        together = joint.diagonal()
        joint = nu.T @ (joint - torch.diag(together)) @ nu + torch.diag(together @ nu)
        merged.append(joint.diagonal().sum())
    return list(reversed(merged))


def path_active_loss(
    probs: Sequence[torch.Tensor],
    active: Sequence[int],
    affinity: torch.Tensor | None,
    switches: RegularizerSwitches = RegularizerSwitches(),
) -> torch.Tensor:
    """L_active read along the tasks' own paths (dymu's default; docs/training.md).

    sum_l sum_{i!=j in A} (L-l)/L A(i,j) 2 (1 - P(paths i, j meet at layer l-1)). The stream
    reading (:func:`active_loss`) compares child (l, i) with child (l, j) by stream index, so
    two active paths that leave their own streams (through an inactive task's nodes) escape
    it and still diverge; following each task's path closes that gap. Where every path stays
    in its own stream until it merges, the two readings agree: ||nu_i - nu_j||^2 = 2 (1 - m).
    """
    n_layers = len(probs) + 1
    total = probs[0].new_zeros(()) if probs else torch.zeros(())
    use_aff = affinity is not None and switches.affinity
    for i in active:
        for j in active:
            if i == j:
                continue
            pair = affinity[i, j].to(total) if use_aff else total.new_ones(())
            for b, m in enumerate(merge_probability(probs, i, j)):
                weight = layer_weight(b, n_layers, switches.layer_weighting)
                total = total + weight * pair * 2 * (1 - m)
    return total


def path_inactive_loss(
    probs: Sequence[torch.Tensor], active: Sequence[int], inactive: Sequence[int]
) -> torch.Tensor:
    """L_inactive along paths: sum_l sum_{j in I} min_{i in A} 2 (1 - P(paths j, i meet at l)).

    The factor 2 makes both path terms equal the stream terms on hard trees whose paths keep
    to their own streams (||e_a - e_b||^2 = 2), so lambda_A and lambda_I keep their scale.
    """
    total = probs[0].new_zeros(()) if probs else torch.zeros(())
    if not inactive or not active:
        return total
    for j in inactive:
        apart = torch.stack(
            [torch.stack([2 * (1 - m) for m in merge_probability(probs, j, i)]) for i in active]
        )  # (|A|, L-1)
        total = total + apart.min(dim=0).values.sum()
    return total


def branching_regularizer(
    probs: Sequence[torch.Tensor],
    r: torch.Tensor,
    c: torch.Tensor | float,
    affinity: torch.Tensor | None,
    tau: float,
    lambda_active: float = 1.0,
    lambda_inactive: float = 0.1,
    switches: RegularizerSwitches = RegularizerSwitches(),
    reading: str = "path",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Omega(r, c) = c * lambda_A * L_active + lambda_I * L_inactive (paper Eq. 6).

    ``reading`` = "path" (default) follows each task's path; "stream" is the paper's literal
    stream-indexed form with the children's P_use.
    """
    active, inactive = task_dichotomy(r, tau, switches.dichotomy)
    if reading == "path":
        l_act = path_active_loss(probs, active, affinity, switches)
        l_inact = path_inactive_loss(probs, active, inactive)
    elif reading == "stream":
        use = usage_probability(probs)
        l_act = active_loss(probs, use, active, affinity, switches)
        l_inact = inactive_loss(probs, active, inactive)
    else:
        raise ValueError(f"unknown regularizer reading {reading!r}; use 'path' or 'stream'")
    if not switches.inactive_loss:
        l_inact = l_act * 0
    omega = float(c) * lambda_active * l_act + lambda_inactive * l_inact
    return omega, {
        "active_loss": float(l_act.detach()),
        "inactive_loss": float(l_inact.detach()),
        "n_active": float(len(active)),
    }


#: How the RSA dissimilarities of two streams become an affinity (``[affinity] score``).
AFFINITY_SCORES = ("row-minmax", "rdm-spearman")


def _similarity_matrices(per_task: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, K, K): S_l(i) = cosine similarities of the K flattened outputs of node (l, i)."""
    sims = []
    for f in per_task:
        flat = torch.nn.functional.normalize(f.flatten(1).double(), dim=1)
        sims.append(flat @ flat.T)
    return torch.stack(sims)


def _row_minmax_affinity(s: torch.Tensor) -> torch.Tensor:
    """App. D: D_l(i, j) = ||S_l(i) - S_l(j)||_F, rows min-max normalized, A_l = 1 - D-hat."""
    d = torch.cdist(s.flatten(1), s.flatten(1))  # Frobenius distance between RDMs
    # Round-off (e.g. a stream that is a rescaled copy) must not be stretched to 1 below.
    d = torch.where(d < 1e-6, torch.zeros_like(d), d)
    lo, hi = d.min(dim=1, keepdim=True).values, d.max(dim=1, keepdim=True).values
    span = hi - lo
    d_hat = torch.where(span > 1e-12, (d - lo) / span.clamp_min(1e-12), torch.zeros_like(d))
    return 1.0 - d_hat


def _rdm_spearman_affinity(s: torch.Tensor) -> torch.Tensor:
    """RSA as Dwivedi & Roig (2019, the paper's ref. [12]) score it: the Spearman correlation of
    the upper triangles of S_l(i) and S_l(j), clamped at 0 (anti-correlated = no affinity)."""
    from scipy.stats import rankdata  # average ranks for ties, as Spearman's rho defines them

    k = s.shape[-1]
    iu = torch.triu_indices(k, k, offset=1)
    upper = s[:, iu[0], iu[1]].numpy()
    ranks = torch.from_numpy(rankdata(upper, axis=1))
    rho = torch.corrcoef(ranks)
    # A stream whose similarities are all equal has no ranking: no affinity to anything else.
    rho = torch.nan_to_num(rho, nan=0.0).clamp(0.0, 1.0)
    return rho.fill_diagonal_(1.0)


@torch.no_grad()
def task_affinity(
    features: Sequence[Sequence[torch.Tensor]], score: str = "row-minmax"
) -> torch.Tensor:
    """RSA task affinity (App. D): ``features[l][i]`` = (K, ...) outputs of node (l, i).

    S_l(i) = K x K cosine similarities of the flattened features; A_l(i, j) is scored from
    S_l(i) and S_l(j); A = mean over layers.

    * ``"row-minmax"`` (the paper's App. D, the default): D_l(i, j) = ||S_l(i) - S_l(j)||_F,
      each row of D_l min-max normalized to [0, 1], A_l = 1 - D_l-hat. A row whose distances are
      all equal (e.g. identical streams) has D-hat = 0, i.e. affinity 1. With N = 2 a row is
      (0, d), so A(0, 1) = 0 whenever the streams differ at all: the score cannot rank one pair.
    * ``"rdm-spearman"``: the Spearman correlation of S_l(i) and S_l(j) (RSA's own score), which
      does not depend on the other tasks and so is informative for N = 2 as well.
    """
    if score not in AFFINITY_SCORES:
        raise ValueError(f"unknown affinity score {score!r}; known: {AFFINITY_SCORES}")
    per_layer = _row_minmax_affinity if score == "row-minmax" else _rdm_spearman_affinity
    layers = [per_layer(_similarity_matrices(per_task)) for per_task in features]
    return torch.stack(layers).mean(0).float()
