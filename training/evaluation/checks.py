"""Evaluation of a trained controllable model on a held-out split.

:func:`evaluate` runs any ``images -> {task: prediction}`` callable (a materialized tree, the
anchor's single-task streams) over a dataset and returns exact split-level losses and metrics.
:func:`method_checks` measures what the shipped model must show (training issue): FLOPs fall
as c grows, a task's loss falls as its preference rises, and a one-hot preference is close to
the single-task stream.
"""

from __future__ import annotations

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


def method_checks(
    model: dymu.ControllableModel,
    dataset: Any,
    n_preferences: int = 200,
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, Any]:
    """The three checks of the shipped model, with every number behind them."""
    tasks = model.config.tasks
    n = model.n_tasks
    anchor_flops = model.anchor_cost().flops
    report: dict[str, Any] = {
        "n_preferences": n_preferences,
        "seed": seed,
        "flop_convention": "1 multiply-add = 2 FLOPs",
    }

    # 1. mean active FLOPs over random r, for c = 0, 0.5, 1 (analytic; no images needed)
    flops = {}
    for c in (0.0, 0.5, 1.0):
        prefs = sample_preferences(n, n_preferences, seed, c=c)
        costs = [model.cost(model.architecture(r, c)).flops for r, _ in prefs]
        flops[str(c)] = {
            "mean_gflops": statistics.fmean(costs) / 1e9,
            "fraction_of_anchor": statistics.fmean(costs) / anchor_flops,
        }
    report["flops_by_c"] = flops
    report["flops_fall_with_c"] = (
        flops["0.0"]["mean_gflops"] >= flops["0.5"]["mean_gflops"] >= flops["1.0"]["mean_gflops"]
        and flops["0.0"]["mean_gflops"] > flops["1.0"]["mean_gflops"]
    )

    # 2. per task: mean loss at r_i >= 0.6 vs r_i <= 0.1, over random (r, c)
    prefs = sample_preferences(n, n_preferences, seed + 1)
    losses = []
    for r, c in prefs:
        net = model.materialize(r, c)
        metrics = evaluate(net, dataset, tasks, batch_size, model.device)
        losses.append({t.name: metrics[t.name]["loss"] for t in tasks})
    control = {}
    for i, t in enumerate(tasks):
        high = [lo[t.name] for (r, _), lo in zip(prefs, losses, strict=True) if r[i] >= 0.6]
        low = [lo[t.name] for (r, _), lo in zip(prefs, losses, strict=True) if r[i] <= 0.1]
        control[t.name] = {
            "mean_loss_r_ge_0.6": statistics.fmean(high) if high else None,
            "mean_loss_r_le_0.1": statistics.fmean(low) if low else None,
            "count_high": len(high),
            "count_low": len(low),
        }
        control[t.name]["holds"] = bool(
            high and low and statistics.fmean(high) < statistics.fmean(low)
        )
    report["task_control"] = control

    # 3. one-hot preference on task i (c = 0) vs the single-task stream i
    single = {}
    for i, t in enumerate(tasks):
        onehot = [1.0 if j == i else 0.0 for j in range(n)]
        net = model.materialize(onehot, 0.0, tasks=[t.name])
        dyn = evaluate(net, dataset, [t], batch_size, model.device)[t.name]["loss"]
        stream = evaluate(
            lambda x, i=i: model.anchor(x, tasks=[i]), dataset, [t], batch_size, model.device
        )[t.name]["loss"]
        single[t.name] = {
            "one_hot_loss": dyn,
            "single_task_loss": stream,
            "ratio": dyn / stream,
            "within_10pct": dyn <= 1.10 * stream,
        }
    report["one_hot_vs_single_task"] = single
    return report
