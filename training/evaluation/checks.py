"""Evaluation of a trained controllable model on a held-out split.

:func:`evaluate` runs any ``images -> {task: prediction}`` callable (a materialized tree, the
anchor's single-task streams) over a dataset and returns exact split-level losses and metrics.
:func:`method_checks` measures what the shipped model must show (training issue): FLOPs fall
as c grows, a task's loss falls as its preference rises, and a one-hot preference is close to
the single-task stream.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import dymu
from dymu.config import TaskSpec
from dymu.preference import sample_preferences

from ..data import collate
from ..tasks import make_meters

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def batches(dataset: Any, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
    """The split in order, collated into batches of ``batch_size`` (the last one may be short)."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


@torch.no_grad()
def evaluate(
    predict: Predictor,
    dataset: Any,
    tasks: Sequence[TaskSpec],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Split-level metrics (including the mean task ``loss``) of ``predict`` per task.

    ``dataset`` is a dataset, or a list of already collated batches (see :func:`batches`), which
    saves decoding the split again when many predictors are evaluated on it.
    """
    meters = make_meters(tasks)
    source = dataset if isinstance(dataset, list) else batches(dataset, batch_size)
    for batch in source:
        out = predict(batch["image"].to(device))
        for t in tasks:
            if t.name in out:
                meters[t.name].update(out[t.name], batch[t.name].to(device))
    return {name: m.compute() for name, m in meters.items() if any(name == t.name for t in tasks)}


#: The frugality values of check 1 (the FLOPs must not rise from one to the next).
CHECK_C = (0.0, 0.5, 1.0)
#: Check 2 compares a task's mean loss where its preference is high (r_i >= HIGH_PREFERENCE)
#: with where it is low (r_i <= LOW_PREFERENCE): the loss must be lower where it is preferred.
HIGH_PREFERENCE = 0.6
LOW_PREFERENCE = 0.1
#: Check 3: the one-hot tree's loss may exceed the single-task stream's by at most 10 %.
ONE_HOT_TOLERANCE = 1.10


def method_checks(
    model: dymu.ControllableModel,
    dataset: Any,
    n_preferences: int = 200,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, Any]:
    """The three checks of the shipped model, with every number behind them."""
    report: dict[str, Any] = {
        "n_preferences": n_preferences,
        "seed": seed,
        "flop_convention": "1 multiply-add = 2 FLOPs",
    }
    report.update(flops_check(model, n_preferences, seed))
    report["task_control"] = task_control_check(model, dataset, n_preferences, seed, batch_size)
    report["one_hot_vs_single_task"] = one_hot_check(model, dataset, batch_size)
    report["resource_shape"] = resource_shape(model)
    report["shared_trees"] = shared_tree_quality(model, dataset, batch_size)
    return report


def flops_check(model: dymu.ControllableModel, n_preferences: int, seed: int) -> dict[str, Any]:
    """Check 1: mean active FLOPs over random r for each c of CHECK_C (analytic; no images)."""
    anchor_flops = model.anchor_cost().flops
    flops = {}
    for c in CHECK_C:
        prefs = sample_preferences(model.n_tasks, n_preferences, seed, c=c)
        costs = [model.cost(model.architecture(r, c)).flops for r, _ in prefs]
        flops[str(c)] = {
            "mean_gflops": statistics.fmean(costs) / 1e9,
            "fraction_of_anchor": statistics.fmean(costs) / anchor_flops,
        }
    means = [flops[str(c)]["mean_gflops"] for c in CHECK_C]
    falls = all(a >= b for a, b in itertools.pairwise(means)) and means[0] > means[-1]
    return {"flops_by_c": flops, "flops_fall_with_c": falls}


def task_control_check(
    model: dymu.ControllableModel, dataset: Any, n_preferences: int, seed: int, batch_size: int
) -> dict[str, Any]:
    """Check 2: per task, the mean loss at high vs low r_i, over random (r, c)."""
    tasks = model.config.tasks
    prefs = sample_preferences(model.n_tasks, n_preferences, seed + 1)
    losses = []
    for r, c in prefs:
        net = model.materialize(r, c)
        metrics = evaluate(net, dataset, tasks, batch_size, model.device)
        losses.append({t.name: metrics[t.name]["loss"] for t in tasks})
    control = {}
    for i, t in enumerate(tasks):
        pairs = list(zip(prefs, losses, strict=True))
        high = [lo[t.name] for (r, _), lo in pairs if r[i] >= HIGH_PREFERENCE]
        low = [lo[t.name] for (r, _), lo in pairs if r[i] <= LOW_PREFERENCE]
        control[t.name] = {
            f"mean_loss_r_ge_{HIGH_PREFERENCE}": statistics.fmean(high) if high else None,
            f"mean_loss_r_le_{LOW_PREFERENCE}": statistics.fmean(low) if low else None,
            "count_high": len(high),
            "count_low": len(low),
            "holds": bool(high and low and statistics.fmean(high) < statistics.fmean(low)),
        }
    return control


def one_hot_check(
    model: dymu.ControllableModel, dataset: Any, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Check 3: a one-hot preference on task i (c = 0) against the single-task stream i."""
    single = {}
    for i, t in enumerate(model.config.tasks):
        onehot = [1.0 if j == i else 0.0 for j in range(model.n_tasks)]
        net = model.materialize(onehot, 0.0, tasks=[t.name])
        dyn = evaluate(net, dataset, [t], batch_size, model.device)[t.name]["loss"]
        stream = evaluate(
            lambda x, i=i: model.anchor(x, tasks=[i]), dataset, [t], batch_size, model.device
        )[t.name]["loss"]
        single[t.name] = {
            "one_hot_loss": dyn,
            "single_task_loss": stream,
            "ratio": dyn / stream,
            "within_10pct": dyn <= ONE_HOT_TOLERANCE * stream,
        }
    return single


def uniform_and_one_hot(n: int) -> dict[str, list[float]]:
    """The centre of the simplex and its corners, named as the reports name them."""
    points = {"uniform": [1.0 / n] * n}
    points.update({f"one-hot {i}": [float(i == j) for j in range(n)] for i in range(n)})
    return points


def resource_shape(model: dymu.ControllableModel) -> dict[str, Any]:
    """The paper's Figure 5 at the simplex's centre and corners: each tree's cost as a fraction
    of the anchor, at c = 0, 0.5 and 1 (all tasks requested; analytic, no images)."""
    anchor = model.anchor_cost().flops
    shape = {
        name: {str(c): model.cost(model.architecture(r, c)).flops / anchor for c in (0.0, 0.5, 1.0)}
        for name, r in uniform_and_one_hot(model.n_tasks).items()
    }
    corners = [v["0.0"] for k, v in shape.items() if k != "uniform"]
    centre = shape["uniform"]
    return {
        "fraction_of_anchor": shape,
        "centre_costs_most_at_c0": centre["0.0"] >= max(corners),
        "max_one_hot_at_c0": max(corners),
        "uniform_c1_over_c0": centre["1.0"] / centre["0.0"],
    }


def shared_tree_quality(
    model: dymu.ControllableModel, dataset: Any, batch_size: int = 50
) -> dict[str, Any]:
    """Every task's metrics on the trees that share nodes (uniform r at c = 0.5 and 1, the
    one-hot trees at c = 0), against its own single-task stream, on the held-out split."""
    tasks = model.config.tasks
    data = list(batches(dataset, batch_size))
    streams = {
        t.name: evaluate(lambda x, i=i: model.anchor(x, tasks=[i]), data, [t], device=model.device)[
            t.name
        ]
        for i, t in enumerate(tasks)
    }
    trees = {
        f"{name} c={c}": (r, c)
        for name, r in uniform_and_one_hot(model.n_tasks).items()
        for c in ((0.5, 1.0) if name == "uniform" else (0.0,))
    }
    out: dict[str, Any] = {"single_task": streams, "trees": {}}
    for key, (r, c) in trees.items():
        metrics = evaluate(model.materialize(r, c), data, tasks, device=model.device)
        out["trees"][key] = {
            t.name: {
                "loss_ratio": metrics[t.name]["loss"] / streams[t.name]["loss"],
                **(
                    {"accuracy_drop": streams[t.name]["accuracy"] - metrics[t.name]["accuracy"]}
                    if "accuracy" in metrics[t.name]
                    else {}
                ),
            }
            for t in tasks
        }
    return out
