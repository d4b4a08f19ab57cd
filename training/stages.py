"""The four stages of dymu's training (paper §3, App. F; docs/design.md, "The stages").

``anchor`` (stage 0: N single-task streams), ``affinity`` (stage 0b: RSA task affinity),
``edge`` (stage 1: edge hypernet + branching regularizer), ``weight`` (stage 2: weight
hypernet). Each stage supplies a loss to :func:`training.loop.train_stage`; stage 1's loss of one
step is :func:`edge_loss`, which the benchmark's training-step case times as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dymu.anchor import AnchorNet, BNDeltas
from dymu.architecture import Architecture
from dymu.config import TaskSpec
from dymu.errors import ConfigError
from dymu.preference import sample_preference

from .branching import (
    RegularizerSwitches,
    branching_regularizer,
    default_tau,
    gumbel_temperature,
    task_affinity,
)
from .config import EdgeStage
from .loop import freeze, task_stats, train_stage
from .paths import (
    batched_regularizer,
    expected_task_losses,
    loss_scaled,
    own_path_losses,
    path_losses,
)
from .run import Run, step_generator
from .selection import StreamSelector
from .tasks import weighted_task_loss
from .trees import TreeTable, full_sharing_pull

#: r ~ Dir(1): the dense share of the path estimator's preferences (uniform on the simplex).
DENSE_ETA = 1.0
#: Images per forward pass of the path table (bounds its memory; the table does not depend on it).
PATH_CHUNK = 16
#: Images per forward pass of stage 0b (bounds its memory; the affinity does not depend on it).
AFFINITY_CHUNK = 16


class SharedTrunk(nn.Module):
    """The anchor read through the fully shared tree (one module, so DDP can wrap it)."""

    def __init__(self, anchor: AnchorNet) -> None:
        super().__init__()
        self.anchor = anchor
        self.tree = Architecture.fully_shared(anchor.n_tasks, anchor.num_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.anchor.forward_tree(x, self.tree)


class MixedPaths(nn.Module):
    """The anchor read through its own streams and through one more tree (stage 0 with
    ``mixing``; one module, so DDP can wrap it)."""

    def __init__(self, anchor: AnchorNet) -> None:
        super().__init__()
        self.anchor = anchor

    def forward(
        self, x: torch.Tensor, tree: Architecture
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.anchor(x), self.anchor.forward_tree(x, tree)


def mixing_tree(run: Run, step: int) -> Architecture:
    """The random tree of stage 0's step ``step`` (every node's parent stream uniform)."""
    anchor = run.model.anchor
    gen = step_generator(run.config.seed, "anchor-mixing", step)
    seed = int(torch.randint(2**62, (1,), generator=gen))
    return Architecture.random(anchor.n_tasks, anchor.num_layers, seed=seed)


def mixed_paths_loss(run: Run, weight: float) -> Callable[..., tuple[torch.Tensor, dict]]:
    """Stage 0 with path mixing: sum_i w_i L_i of the streams, plus ``weight`` x the same
    sum read through :func:`mixing_tree` (docs/training.md, "Path mixing")."""

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with run.autocast():
            own, mixed = net(batch["image"], mixing_tree(run, step))
        total, per_task = weighted_task_loss(run.tasks, own, batch, None)
        mixed_total, _ = weighted_task_loss(run.tasks, mixed, batch, None)
        return total + weight * mixed_total, {**task_stats(per_task), "mixed": mixed_total.item()}

    return loss_fn


def copy_trunk(anchor: AnchorNet) -> None:
    """Stream 0's layers below the top (the trained trunk) into every other stream."""
    for j in range(1, anchor.n_tasks):
        for layer in range(anchor.num_layers - 1):
            anchor.node(layer, j).load_state_dict(anchor.node(layer, 0).state_dict())


def all_tasks_loss(run: Run) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """sum_i w_i L_i of ``net(image)``, every task at once: the loss of stage 0 (independent
    streams, so N separate runs) and of the trunk (one shared tree)."""

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with run.autocast():
            out = net(batch["image"])
        total, per_task = weighted_task_loss(run.tasks, out, batch, None)
        return total, task_stats(per_task)

    return loss_fn


def stage_trunk(run: Run, start: int, opt_state: Any = None) -> None:
    """Before stage 0: the fully shared tree on sum_i w_i L_i, then copied into every stream
    (the common trunk, docs/training.md)."""
    cfg = run.config.trunk
    loss_fn = all_tasks_loss(run)
    # The other streams' lower layers are unused until the copy: DDP must look for them.
    train_stage(
        run, "trunk", SharedTrunk(run.model.anchor), cfg, start, opt_state, loss_fn,
        lambda s: cfg.lr, weight_decay=cfg.weight_decay, find_unused=True,
    )  # fmt: skip
    copy_trunk(run.model.anchor)


def stage_anchor(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 0: each stream trained alone on its own task (sum of independent losses); with
    ``select_every``, each ends at its lowest calibration loss (training/selection.py); with
    ``mixing``, a random tree's loss is added at each step (:func:`mixed_paths_loss`)."""
    cfg, anchor = run.config.anchor, run.model.anchor
    selector = StreamSelector.begin(run, start) if cfg.select_every else None
    mixing = cfg.mixing > 0
    train_stage(
        run,
        "anchor",
        MixedPaths(anchor) if mixing else anchor,
        cfg,
        start,
        opt_state,
        mixed_paths_loss(run, cfg.mixing) if mixing else all_tasks_loss(run),
        lambda s: cfg.lr,
        weight_decay=cfg.weight_decay,
        after_step=selector.observe if selector else None,
    )
    if selector is not None:
        run.notes["anchor"] = {"selection": selector.finish()}


@torch.no_grad()
def stage_affinity(run: Run) -> torch.Tensor:
    """Stage 0b: RSA task affinity over K training images (App. D)."""
    anchor = run.model.anchor.eval()
    feats: list[list[list[torch.Tensor]]] = [
        [[] for _ in range(anchor.n_tasks)] for _ in range(anchor.num_layers)
    ]
    for batch in run.sample_batches("affinity", run.config.affinity.images, AFFINITY_CHUNK):
        x = batch["image"]
        for j in range(anchor.n_tasks):
            y = x
            for l in range(anchor.num_layers):
                y = anchor.node(l, j)(y)
                feats[l][j].append(y.float().cpu())
    return task_affinity(
        [[torch.cat(f) for f in per_task] for per_task in feats], run.config.affinity.score
    )


def gumbel_softmax(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """nu = softmax((logits + g) / tau), g ~ Gumbel(0, 1) drawn from ``gen`` (repeatable)."""
    u = torch.rand(logits.shape, generator=gen).to(logits.device).clamp(1e-10, 1 - 1e-10)
    return torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


@dataclass(frozen=True)
class EdgeObjective:
    """What stays fixed over stage 1: the stage's options, the tasks, A and the threshold tau."""

    cfg: EdgeStage
    tasks: tuple[TaskSpec, ...]
    affinity: torch.Tensor
    tau: float
    switches: RegularizerSwitches

    @classmethod
    def build(
        cls,
        cfg: EdgeStage,
        tasks: tuple[TaskSpec, ...],
        affinity: torch.Tensor | None,
        device: torch.device,
    ) -> EdgeObjective:
        """The objective of ``cfg``; no affinity (stage 0b skipped) means A = 1 everywhere."""
        n = len(tasks)
        tau = cfg.tau if cfg.tau is not None else default_tau(n)
        switches = RegularizerSwitches(
            cfg.inactive_loss, cfg.layer_weighting, cfg.affinity, cfg.dichotomy
        )
        aff = (affinity if affinity is not None else torch.ones(n, n)).to(device)
        return cls(cfg, tuple(tasks), aff, tau, switches)


def edge_loss(
    net: nn.Module,
    anchor: AnchorNet,
    objective: EdgeObjective,
    step: int,
    batch: dict,
    gen: torch.Generator,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step of stage 1: sum_i r_i w_i L_i + Omega(r, c) (paper Eq. 2, with Eq. 4 and 6).

    ``net`` is the edge hypernet (possibly under DDP); r, c and the Gumbel noise are drawn from
    ``gen`` in that order.
    """
    cfg, device = objective.cfg, objective.affinity.device
    r, c = sample_preference(len(objective.tasks), cfg.eta, gen)
    r = r.to(device)
    zeta = gumbel_temperature(
        step, cfg.temperature_start, cfg.temperature_decay, cfg.temperature_period()
    )
    logits = net(r, c.to(device))
    if cfg.logit_bound is not None:  # monotonic: the arg-max tree is unchanged
        logits = cfg.logit_bound * torch.tanh(logits / cfg.logit_bound)
    nu = gumbel_softmax(logits, zeta, gen)
    with autocast():
        out = anchor.forward_soft(batch["image"], list(nu))
    task_total, per_task = weighted_task_loss(objective.tasks, out, batch, r)
    probs = nu.float() if cfg.regularize_samples else torch.softmax(logits.float(), dim=-1)
    omega, reg = branching_regularizer(
        list(probs),
        r,
        c,
        objective.affinity,
        objective.tau,
        cfg.lambda_active,
        cfg.lambda_inactive,
        objective.switches,
        cfg.regularizer,
    )
    stats = {"task_loss": task_total.item(), "omega": omega.item(), "zeta": zeta, **reg}
    return task_total + omega, {**stats, **task_stats(per_task)}


def stage_edge(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 1: edge hypernet; loss = sum_i r_i w_i L_i + Omega(r, c) (paper Eq. 2, 6)."""
    cfg, model = run.config.edge, run.model
    if cfg.estimator == "paths":
        return stage_edge_paths(run, start, opt_state)
    if cfg.estimator == "trees":
        return stage_edge_trees(run, start, opt_state)
    freeze(model.anchor)
    objective = EdgeObjective.build(cfg, run.tasks, run.affinity, run.device)

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(run.config.seed, "edge-pref", step)
        return edge_loss(net, model.anchor, objective, step, batch, gen, run.autocast)

    train_stage(run, "edge", model.edge_hypernet, cfg, start, opt_state, loss_fn, cfg.lr_at)


def table_split(run: Run) -> str:
    """The split the run's path table is read on: the calibration split where the config has
    one and ``path_split`` names it, else the training split."""
    on_calibration = run.config.edge.path_split == "calibration"
    return "calibration" if on_calibration and run.calibration_set is not None else "training"


@torch.no_grad()
def path_table(run: Run) -> torch.Tensor:
    """w_j T[j, p] on ``path_images`` images (training/paths.py), seeded by the run: from the
    calibration split where the config has one (images no stage trained on, so the table
    measures what a path costs on unseen images, not how well a stream fits its own training
    set; docs/training.md, "The calibration split"), else, or with ``path_split =
    "training"``, from the training split.

    With ``path_scale = "single-task"`` w_j = 1 / T[j, own path]: every task's loss counts in
    units of its own stream's, so the regularizer trades the same relative loss for sharing
    whatever the task's loss level (multidigits' training losses are ~0.005, scenes' ~0.5).
    """
    on_calibration = table_split(run) == "calibration"
    batches = run.sample_batches(
        "edge-paths", run.config.edge.path_images, PATH_CHUNK, calibration=on_calibration
    )
    table = path_losses(run.model.anchor.eval(), batches, run.tasks)
    if run.config.edge.path_scale == "single-task":
        return (table / own_path_losses(table).clamp_min(1e-12).unsqueeze(1)).to(run.device)
    return loss_scaled(table, run.tasks).to(run.device)


@torch.no_grad()
def branched_init_(hyper: nn.Module, bias: float) -> None:
    """Every child's logit for its own stream's parent starts ``bias`` above the others.

    The expected loss of a path is a product of parent choices, so from a uniform start the
    regularizer's pull toward one shared path wins before any task's own path can emerge
    (docs/training.md); starting at the anchor lets sharing grow where it pays.
    """
    n = hyper.n_tasks
    for head in hyper.heads:
        head.bias.copy_((torch.eye(n) * bias).flatten().to(head.bias))


def edge_preferences(
    cfg: EdgeStage, n: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's ``preferences`` (r, c) pairs of the table estimators (:func:`step_preferences`),
    stacked on ``device``."""
    prefs = step_preferences(n, cfg.preferences, cfg.dense_fraction, cfg.eta, gen)
    r = torch.stack([p[0] for p in prefs]).to(device)
    c = torch.stack([p[1] for p in prefs]).to(device)
    return r, c


def step_preferences(
    n: int, count: int, dense_fraction: float, eta: float, gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A step's ``count`` training preferences (r, c): r ~ Dir(1) for the first
    ``dense_fraction`` share, Dir(eta) for the rest, c ~ U(0, 1); drawn from ``gen`` in order."""
    dense = round(dense_fraction * count)
    return [sample_preference(n, DENSE_ETA if k < dense else eta, gen) for k in range(count)]


def edge_paths_loss(
    net: nn.Module, objective: EdgeObjective, table: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step of stage 1 with the path table: the mean over ``preferences`` (r, c) pairs of
    E_tree[sum_i r_i w_i L_i] + Omega(r, c), exact on softmax(logits) (training/paths.py)."""
    cfg = objective.cfg
    r, c = edge_preferences(cfg, len(objective.tasks), gen, objective.affinity.device)
    logits = net(r, c)
    if cfg.logit_bound is not None:
        logits = cfg.logit_bound * torch.tanh(logits / cfg.logit_bound)
    probs = torch.softmax(logits.float(), dim=-1)
    task = (r * expected_task_losses(probs, table)).sum(-1)
    omega, l_act, l_inact = batched_regularizer(
        probs, r, c, objective.affinity, objective.tau, cfg.lambda_active,
        cfg.lambda_inactive, objective.switches,
    )  # fmt: skip
    stats = {
        "task_loss": task.mean().item(),
        "omega": omega.mean().item(),
        "active_loss": l_act.mean().item(),
        "inactive_loss": l_inact.mean().item(),
    }
    return (task + omega).mean(), stats


def stage_edge_paths(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 1 with the path-table estimator (``[edge] estimator = "paths"``)."""
    cfg, model = run.config.edge, run.model
    freeze(model.anchor)
    objective = EdgeObjective.build(cfg, run.tasks, run.affinity, run.device)
    table = path_table(run)
    if start == 0 and cfg.branched_init:
        branched_init_(model.edge_hypernet, cfg.branched_init)

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return edge_paths_loss(
            net, objective, table, step_generator(run.config.seed, "edge-pref", step)
        )

    train_stage(run, "edge", model.edge_hypernet, cfg, start, opt_state, loss_fn, cfg.lr_at)


def edge_trees_loss(
    net: nn.Module,
    objective: EdgeObjective,
    trees: TreeTable,
    gen: torch.Generator,
    lambda_active: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step of stage 1 with the tree table: cross-entropy of the hypernet's parent logits
    against each sampled preference's best hard tree, on the nodes that tree uses
    (training/trees.py). ``lambda_active``: the pull's weight as applied (default: the
    config's; :func:`applied_lambda_active`)."""
    cfg = objective.cfg
    lam = cfg.lambda_active if lambda_active is None else lambda_active
    r, c = edge_preferences(cfg, len(objective.tasks), gen, objective.affinity.device)
    best = trees.best(r, c, lam, cfg.lambda_inactive)
    target, used = trees.parents[best].to(r.device), trees.used[best].to(r.device)
    logits = net(r, c).float()
    ce = nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none")
    used_f = used.flatten().to(ce)
    loss = (ce * used_f).sum() / used_f.sum()
    agree = ((logits.argmax(-1) == target) | ~used).flatten(1).all(-1)
    stats = {
        "tree_agreement": agree.float().mean().item(),
        "task_loss": (r.double().cpu() * trees.task_losses[best.cpu()]).sum(-1).mean().item(),
    }
    return loss, stats


def applied_lambda_active(cfg: EdgeStage, trees: TreeTable, seed: int) -> tuple[float, dict]:
    """lambda_A as the objective applies it, and what the choice measured: the config's value,
    or with ``pull_scale = "table"`` that value times the table's full-sharing pull
    (training/trees.py, :func:`full_sharing_pull`)."""
    if cfg.pull_scale == "absolute":
        return cfg.lambda_active, {}
    pull = full_sharing_pull(trees, cfg.lambda_inactive, seed)
    applied = cfg.lambda_active * pull
    return applied, {"sharing_pull": pull, "lambda_active_applied": applied}


def stage_edge_trees(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 1 with the tree-table estimator (``[edge] estimator = "trees"``)."""
    cfg, model = run.config.edge, run.model
    freeze(model.anchor)
    objective = EdgeObjective.build(cfg, run.tasks, run.affinity, run.device)
    trees = TreeTable.build(
        path_table(run), model.n_layers, objective.affinity, objective.tau, objective.switches
    )
    lam, measured = applied_lambda_active(cfg, trees, run.config.seed)
    if measured:
        run.notes["edge"] = measured

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return edge_trees_loss(
            net, objective, trees, step_generator(run.config.seed, "edge-pref", step), lam
        )

    train_stage(run, "edge", model.edge_hypernet, cfg, start, opt_state, loss_fn, cfg.lr_at)


def stage_weight(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 2: weight hypernet on the arg-max trees inference will use; loss = sum r_i w_i L_i."""
    freeze(run.model.anchor)
    freeze(run.model.edge_hypernet)

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return weight_loss(run, net, step, batch)

    cfg = run.config.weight
    hyper = run.model.weight_hypernet
    # Only the used nodes' heads get gradients in a step: DDP must look for unused parameters.
    train_stage(
        run, "weight", hyper, cfg, start, opt_state, loss_fn, cfg.lr_at,
        find_unused=True, calibration=cfg.images == "calibration",
    )  # fmt: skip


def weight_loss(
    run: Run, net: nn.Module, step: int, batch: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step of stage 2: the mean over the step's ``[weight] preferences`` (r, c) of
    sum_i r_i w_i L_i, each on its own group of the batch, its arg-max tree and the BN deltas
    ``net`` predicts for it (App. G; docs/training.md, "The weight stage's images and
    preferences")."""
    cfg, model = run.config.weight, run.model
    gen = step_generator(run.config.seed, "weight-pref", step)
    prefs = step_preferences(model.n_tasks, cfg.preferences, cfg.dense_fraction, cfg.eta, gen)
    if len(batch["image"]) < len(prefs):  # a process's shard under --nproc
        raise ConfigError(
            f"[weight] preferences ({len(prefs)}) exceeds the {len(batch['image'])} images of "
            "this process's batch (batch_size / --nproc): every preference needs an image"
        )
    totals, per_task = [], {}
    for (r, c), group in zip(prefs, batch_groups(batch, len(prefs)), strict=True):
        r, c = r.to(run.device), c.to(run.device)
        with torch.no_grad():
            arch = Architecture.from_logits(model.edge_hypernet(r, c).cpu())
        deltas = net(r, c, arch.node_list(), arch)
        with run.autocast():
            out = model.anchor.forward_tree(group["image"], arch, deltas)
        total, losses = weighted_task_loss(run.tasks, out, group, r)
        if cfg.delta_penalty:
            channels = model.weight_hypernet.num_bn_channels
            total = total + cfg.delta_penalty * delta_penalty(deltas, channels)
        totals.append(total)
        for name, value in losses.items():
            per_task.setdefault(name, []).append(value)
    # Groups weigh alike, not by image count: each is one sample of E_(r,c)[sum_i r_i w_i L_i].
    stats = {name: torch.stack(v).mean() for name, v in per_task.items()}
    return torch.stack(totals).mean(), task_stats(stats)


def delta_penalty(deltas: BNDeltas, channels: int) -> torch.Tensor:
    """sum(dgamma^2 + dbeta^2) over ``deltas`` / (2 x ``channels``), the hypernet's whole BN
    layout: the mean square delta, each channel priced alike whatever tree reads it
    (``[weight] delta_penalty``).

    A departure from App. G (docs/training.md, "Deltas that follow r"): with beta times this
    beside sum_i r_i w_i L_i, the best deltas of a node only task i reads shrink as r_i falls
    (a quadratic model gives r_i / (r_i + const)), so a task's adaptation, and its loss,
    follow its preference; without it those deltas have one optimum for every r_i > 0.
    """
    pairs = [pair for bns in deltas.values() for pair in bns.values()]
    squares = [g.square().sum() + b.square().sum() for g, b in pairs]
    if not squares:
        raise ValueError("delta_penalty: no BN deltas (the tree's nodes have no BatchNorm)")
    return torch.stack(squares).sum() / (2 * channels)


def batch_groups(batch: dict, count: int) -> list[dict]:
    """``batch`` split along its first dimension into ``count`` nearly equal groups (the weight
    stage's one group per preference); tensors are split, any other entry is shared."""
    size = len(batch["image"])
    bounds = torch.linspace(0, size, count + 1).round().long().tolist()
    return [
        {
            k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and len(v) == size else v
            for k, v in batch.items()
        }
        for lo, hi in itertools.pairwise(bounds)
    ]


#: The stages that train (stage 0b computes the affinity instead: :func:`stage_affinity`).
TRAINING_STAGES = {
    "trunk": stage_trunk,
    "anchor": stage_anchor,
    "edge": stage_edge,
    "weight": stage_weight,
}
