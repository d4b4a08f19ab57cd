"""A model on which c moves compute: the shipped models' c barely does (docs/results-training.md),
so budgets and degrading under load (docs/service.md, "Budgets", "Degrade under load") are
measured and tested on this one as well.

:func:`make_frugal` sets the edge hypernet's weights so that c alone chooses the tree: at c = 0
every node reads its own stream (the anchor net, the most expensive tree), and as c passes
``thresholds[b]`` the children of layer boundary b all read stream 0, so the trunk is shared
from the image up, one more layer at each threshold; at c = 1 the tree is fully shared. The
thresholds are not round numbers, so no canonical c (10^-6 steps) is a tie. The anchor and the
weight hypernet keep their (seeded, random) weights. Deterministic: the same config and seed
give the same artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import dymu
from dymu.config import ModelConfig

#: The c at which boundary b starts to share (for a 5-layer anchor: 4 boundaries).
DEFAULT_THRESHOLDS = (0.1234567, 0.3456789, 0.5678901, 0.7890123)


def thresholds_for(n_boundaries: int) -> tuple[float, ...]:
    """:data:`DEFAULT_THRESHOLDS` for 4 boundaries, else evenly spread non-round values."""
    if n_boundaries == len(DEFAULT_THRESHOLDS):
        return DEFAULT_THRESHOLDS
    return tuple((b + 0.5) / n_boundaries * 0.9 + 0.0123457 for b in range(n_boundaries))


@torch.no_grad()
def make_frugal(
    model: dymu.ControllableModel, thresholds: Sequence[float] | None = None
) -> dymu.ControllableModel:
    """Give ``model``'s edge hypernet weights under which c moves the tree (module docstring).

    The embedding is ``p = (c, 0, ..., 0)``; the MLP passes ``(c, 1)`` through its first two
    units; head b's logits are 1 for a node's own stream and ``c / thresholds[b]`` for stream 0.
    """
    h = model.edge_hypernet
    n, boundaries = model.n_tasks, model.n_layers - 1
    t = tuple(thresholds) if thresholds is not None else thresholds_for(boundaries)
    if len(t) != boundaries or not all(0 < v < 1 for v in t):
        raise ValueError(f"need {boundaries} thresholds in (0, 1), got {t}")
    h.embedding.task_embeddings.zero_()
    h.embedding.cost_embedding.zero_()
    h.embedding.cost_embedding[0] = 1.0
    linears = [m for m in h.mlp if isinstance(m, torch.nn.Linear)]
    if not linears or min(lin.out_features for lin in linears) < 2:
        raise ValueError("make_frugal needs an edge hypernet MLP with at least 2 units a layer")
    for i, lin in enumerate(linears):
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = 1.0  # c
        if i == 0:
            lin.bias[1] = 1.0  # the constant 1
        else:
            lin.weight[1, 1] = 1.0
    for b, head in enumerate(h.heads):
        head.weight.zero_()
        head.bias.zero_()
        for j in range(n):
            head.weight[j * n + j, 1] = 1.0  # own stream: logit 1
            if j:
                head.weight[j * n, 0] = 1.0 / t[b]  # stream 0: logit c / t_b
    return model.eval()


def frugal_model(config: ModelConfig, seed: int = 0) -> dymu.ControllableModel:
    """A seeded random model of ``config`` with :func:`make_frugal`'s controller."""
    torch.manual_seed(seed)
    return make_frugal(dymu.create_model(config))


def save_frugal(config: ModelConfig, out: Path, seed: int = 0) -> tuple[Path, float]:
    """Save :func:`frugal_model` as the store ``out`` (a new version); returns the store and the
    ratio FLOPs(c = 1) / FLOPs(c = 0) at the model's input size (uniform r, every task)."""
    model = frugal_model(config, seed)
    dymu.save(model, out)
    return out, c_ratio(model)


def c_ratio(model: dymu.ControllableModel, r: Sequence[float] | None = None) -> float:
    """FLOPs of the c = 1 tree over those of the c = 0 tree (uniform r by default)."""
    r = list(r) if r is not None else [1.0] * model.n_tasks
    costs = [model.cost(model.architecture(r, c)).flops for c in (0.0, 1.0)]
    return costs[1] / costs[0]
