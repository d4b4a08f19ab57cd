"""The evaluation loop: every row at every preference on the held-out split (paper §4.1).

For each row, P preferences r (uniform on the simplex, fixed seed:
:func:`dymu.preference.sample_preferences`) at the row's c give P loss vectors
``(w_i L_i)_i`` (split-level losses, see :mod:`training.evaluation.metrics`), their hypervolume
and mean uniformity, the split-level metrics and Δ_m against the Single-Task row; inference
params and GFLOPs are means over ``cost_preferences`` (1,000) preferences from dymu's cost
model. The sweeps behind the figures (marginal controllability, pairwise trade-offs, resource
usage over the simplex) use the same
:class:`Evaluator`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dymu.config import TaskSpec
from dymu.preference import sample_preferences

from ..tasks import delta_m
from .checks import evaluate
from .methods import Row
from .metrics import Hypervolume, hypervolume, uniformity

#: One preference of the evaluation: ``(r, c)``, c None where the row brings its own c. Not
#: :class:`dymu.Preference` (a validated preference), hence the other name.
PreferencePoint = tuple[list[float], float | None]


@dataclass
class Point:
    """One method at one preference: the numbers of one ``per_preference`` entry."""

    r: list[float]
    c: float | None
    losses: dict[str, float]  # w_i * L_i, the loss vector of the hypervolume
    metrics: dict[str, dict[str, float]]  # split-level metrics per task (``loss`` unscaled)
    flops: int
    params: int
    delta_m: float | None = None

    def vector(self, tasks: Sequence[str]) -> list[float]:
        return [self.losses[t] for t in tasks]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "r": self.r,
            "c": self.c,
            "losses": self.losses,
            "metrics": self.metrics,
            "flops": self.flops,
            "params": self.params,
        }
        if self.delta_m is not None:
            out["delta_m"] = self.delta_m
        return out


@dataclass
class RowResult:
    """A row's numbers: the table's columns and everything behind them."""

    row: Row
    points: list[Point]
    hv: Hypervolume
    uniformity: float
    gflops: float  # mean over the cost preferences
    params: float
    delta_m: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def loss_vector(
    tasks: Sequence[TaskSpec], metrics: dict[str, dict[str, float]]
) -> dict[str, float]:
    """``{task: w_i * L_i}`` from split-level metrics (``loss`` is the unscaled task loss)."""
    return {t.name: metrics[t.name]["loss"] * t.loss_scale for t in tasks}


def mean_cost(
    method: Any, c: float | None, preferences: Sequence[PreferencePoint]
) -> tuple[float, float]:
    """Mean (GFLOPs, params) of ``method`` over ``preferences`` at cost preference ``c``.

    Methods with a tree (dymu) are costed from their architecture alone (no weights are built);
    any other method is materialized and asked for ``.cost()``.
    """
    costs = []
    fast = hasattr(method, "architecture") and hasattr(method, "cost")
    for r, _ in preferences:
        if fast:
            costs.append(method.cost(method.architecture(r, 0.0 if c is None else c)))
        else:
            costs.append(method.materialize(r, c).cost())
    return (
        statistics.fmean(x.flops for x in costs) / 1e9,
        statistics.fmean(x.params for x in costs),
    )


class Evaluator:
    """Evaluates methods at preferences on one held-out split (collated once, kept in memory)."""

    def __init__(
        self,
        dataset: Any,
        tasks: Sequence[TaskSpec],
        *,
        batch_size: int = 50,
        device: torch.device | str = "cpu",
        progress: Any = None,
    ) -> None:
        from .checks import batches

        self.tasks = tuple(tasks)
        self.names = tuple(t.name for t in self.tasks)
        self.batches = list(batches(dataset, batch_size))
        self.n_images = len(dataset)
        self.device = device
        self.progress = progress
        self.single_task: dict[str, dict[str, float]] | None = None
        self._cache: dict[Hashable, tuple[dict, int, int]] = {}
        self.evaluations = 0

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def describe(self, label: str) -> None:
        """Name what the progress bar counts now (first 40 characters)."""
        if self.progress is not None:
            self.progress.set_description(label[:40])

    @torch.no_grad()
    def point(
        self, method: Any, r: Sequence[float], c: float | None, key: Hashable = None
    ) -> Point:
        """Materialize ``method`` at ``(r, c)`` and evaluate it on the whole split."""
        if key is not None and key in self._cache:
            metrics, flops, params = self._cache[key]
        else:
            net = method.materialize(list(r), c)
            metrics = evaluate(net, self.batches, self.tasks, device=self.device)
            cost = net.cost()
            flops, params = int(cost.flops), int(cost.params)
            self.evaluations += 1
            if key is not None:
                self._cache[key] = (metrics, flops, params)
        self._tick()
        point = Point(
            [float(x) for x in r], c, loss_vector(self.tasks, metrics), metrics, flops, params
        )
        if self.single_task is not None:
            point.delta_m = relative_to_single_task(metrics, self.single_task)
        return point

    def row_points(self, row: Row, preferences: Sequence[PreferencePoint]) -> list[Point]:
        """The row at each preference (the static group: each network at its own r_k)."""
        self.describe(row.label)
        if row.members is not None:
            return [self.point(m, list(m.r), None) for m in row.members]
        return [self.point(row.method, r, row.c, row.cache_key(r, row.c)) for r, _ in preferences]

    def row_result(
        self,
        row: Row,
        preferences: Sequence[PreferencePoint],
        reference: Sequence[float],
        cost_preferences: Sequence[PreferencePoint],
    ) -> RowResult:
        points = self.row_points(row, preferences)
        hv = hypervolume([p.vector(self.names) for p in points], reference)
        unif = statistics.fmean(uniformity(p.r, p.vector(self.names)) for p in points)
        if row.members is not None:  # one fixed network each: the mean over the group
            gflops = statistics.fmean(p.flops for p in points) / 1e9
            params = statistics.fmean(p.params for p in points)
        else:
            gflops, params = mean_cost(row.method, row.c, cost_preferences)
        dms = [p.delta_m for p in points if p.delta_m is not None]
        return RowResult(
            row, points, hv, unif, gflops, params, statistics.fmean(dms) if dms else None
        )


def relative_to_single_task(
    metrics: dict[str, dict[str, float]], single: dict[str, dict[str, float]]
) -> float | None:
    """Δ_m (:func:`training.tasks.delta_m`) over the metrics whose single-task value can be a
    denominator (finite, non-zero: e.g. a "% within 11.25°" of 0 cannot); None if none can."""
    usable = {
        t: {m: v for m, v in values.items() if math.isfinite(v) and v != 0}
        for t, values in single.items()
    }
    shared = {
        t: {m: v for m, v in metrics[t].items() if m in usable[t] and m != "loss"}
        for t in metrics
        if t in usable
    }
    shared = {t: v for t, v in shared.items() if v}
    return delta_m(shared, usable) if shared else None


def preferences(n_tasks: int, count: int, seed: int) -> list[PreferencePoint]:
    """``count`` preferences r uniform on the simplex (Dir(1)) from ``seed`` (c comes per row)."""
    return [(r, None) for r, _ in sample_preferences(n_tasks, count, seed)]


def marginal_grid(n_tasks: int, points: int) -> list[tuple[int, float, list[float]]]:
    """(task i, r_i, r) with r_i on ``points`` evenly spaced values in [0, 1] and the rest split
    evenly among the other tasks (paper Fig. 7: task i's loss against its preference)."""
    out = []
    for i in range(n_tasks):
        for k in range(points):
            ri = k / (points - 1)
            rest = (1 - ri) / (n_tasks - 1)
            out.append((i, ri, [ri if j == i else rest for j in range(n_tasks)]))
    return out


def pair_grid(n_tasks: int, points: int) -> list[tuple[int, int, float, list[float]]]:
    """(i, j, t, r) with r = t e_i + (1 − t) e_j, the other tasks at 0 (paper Figs. 13–14)."""
    out = []
    for i in range(n_tasks):
        for j in range(i + 1, n_tasks):
            for k in range(points):
                t = k / (points - 1)
                r = [0.0] * n_tasks
                r[i], r[j] = t, 1 - t
                out.append((i, j, t, r))
    return out


def simplex_grid(n_tasks: int, steps: int) -> list[list[float]]:
    """Points of the simplex with coordinates in multiples of 1/steps (N ≤ 3), or a fixed
    random sample (N > 3) for the resource-usage figure (Fig. 5)."""
    if n_tasks == 2:
        return [[k / steps, 1 - k / steps] for k in range(steps + 1)]
    if n_tasks == 3:
        return [
            [a / steps, b / steps, (steps - a - b) / steps]
            for a in range(steps + 1)
            for b in range(steps + 1 - a)
        ]
    return [r for r, _ in sample_preferences(n_tasks, 300, seed=1234)]


def finite(x: float | None) -> float | None:
    """JSON has no NaN: None instead."""
    return None if x is None or not math.isfinite(x) else x
