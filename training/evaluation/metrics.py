"""Set-level metrics of a controllable model (paper §4.1, App. J; docs/design.md §5).

* :func:`hypervolume` — the volume of loss space dominated by a set of loss vectors and bounded
  by a reference point (App. J, eq. 10), computed with moocore: exactly up to
  :data:`EXACT_MAX_OBJECTIVES` objectives, with moocore's deterministic approximation beyond
  (exact HV of 20 points in 20 objectives, the CIFAR-100 setting, takes over a minute).
* :func:`uniformity` — ``μ_r = 1 − KL(L̂ ‖ 1/N)``, ``L̂_j = r_j L_j / Σ_i r_i L_i`` (§4.1).
* :func:`uniformity_reach` — the lowest and highest uniformity over a box of loss vectors (how far
  a part of the model that moves each loss within known bounds could move uniformity).
* :func:`spearman` — Spearman's ρ of two sequences, claim 2's statistic (ρ(r_i, w_i L_i) < 0).
* :func:`bootstrap_interval` — a percentile bootstrap interval of a statistic over a set of
  preferences (resampled whole, so a preference's points at c = 0 and c = 1 stay together).
* :data:`REFERENCE_POINTS` — the reference point of every benchmark, with the reason for it.

**Loss vectors.** Every loss vector here is ``(w_1 L_1, …, w_N L_N)``: the unscaled split-level
task losses of :mod:`training.tasks` times the task's loss scale ``w_i`` (App. G), i.e. the terms
of the objective ``Σ_i r_i w_i L_i`` that every method is trained on. The paper's reference points
([4, 4, 4] on NYU-v2 with normal losses of 2–4 in its Fig. 7) are in these units too.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "APPROX_METHOD",
    "APPROX_SAMPLES",
    "APPROX_SEED",
    "BOOTSTRAP_LEVEL",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "EXACT_MAX_OBJECTIVES",
    "REFERENCE_POINTS",
    "Hypervolume",
    "bootstrap_interval",
    "hypervolume",
    "reference_point",
    "uniformity",
    "uniformity_reach",
]

#: Up to this many objectives the hypervolume is exact (moocore.hypervolume); beyond, approximate.
EXACT_MAX_OBJECTIVES = 10
#: moocore.hv_approx settings beyond :data:`EXACT_MAX_OBJECTIVES`: a deterministic low-discrepancy
#: method (the seed is passed for completeness; the method ignores it) with a fixed sample count,
#: so the same loss vectors always give the same number. Measured on 20 random points: relative
#: error 2e-3 in 12 objectives (against the exact value), 0.1 s in 20 objectives.
APPROX_METHOD = "Rphi-FWE+"
APPROX_SAMPLES = 2**18
APPROX_SEED = 0
#: The claims' intervals (docs/evaluation.md, "How sure a claim is"): 95 % percentile intervals
#: from 2,000 resamples of the preferences, with a fixed seed so a report is reproducible.
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class ReferencePoint:
    """One benchmark's reference point (task name -> value, in w_i·L_i units) and why."""

    values: Mapping[str, float]
    why: str


#: Reference points per benchmark (loss vectors are w_i·L_i; see the module docstring).
#:
#: For the project's own benchmarks the point is the loss of a model that *ignores the image*:
#: the best image-independent prediction on the held-out split (class frequencies for
#: cross-entropy, the median depth for L1, the mean normal direction for 1 − cos), times w_i,
#: rounded up (``python -m training.evaluation.metrics scenes`` prints the measurement). A point
#: beyond it in some task is no better than guessing on that task and so adds no volume.
#: For the paper's benchmarks the paper's own reference points are kept (Tables 1–4), so numbers
#: stay comparable with the paper.
REFERENCE_POINTS: dict[str, ReferencePoint] = {
    "scenes": ReferencePoint(
        # measured on scenes-small's held-out split (200 images, seed 2, 96x128):
        # segmentation 1.297, depth 3 x 1.792 = 5.375, normals 10 x 0.3610 = 3.610
        {"segmentation": 1.3, "depth": 5.4, "normals": 3.7},
        "loss of the best image-independent prediction on the held-out split, rounded up",
    ),
    "multidigits": ReferencePoint(
        # measured on multidigits' held-out split (2,000 pairs, seed 2): 2.300 and 2.299
        # (10 nearly balanced classes: ln 10 = 2.303)
        {"left": 2.31, "right": 2.31},
        "cross-entropy of the class prior (ln 10: no better than guessing), rounded up",
    ),
    "nyuv2": ReferencePoint(
        {"segmentation": 4.0, "normals": 4.0, "depth": 4.0},
        "the paper's reference point (Table 3)",
    ),
    "pascal-context": ReferencePoint(
        {"semseg": 3.0, "human_parts": 3.0, "sal": 3.0, "normals": 3.0, "edge": 3.0},
        "the paper's reference point (Tables 1-2)",
    ),
    "cifar100-20": ReferencePoint({}, "the paper's reference point (Table 4): 1 per task"),
}
_DEFAULT_VALUE = {"cifar100-20": 1.0}


def reference_point(benchmark: str, tasks: Sequence[str]) -> list[float]:
    """The reference point of ``benchmark`` for ``tasks`` (in that order).

    Raises :class:`ValueError` naming what is missing when the benchmark or a task has no
    reference value (pass an explicit point then, e.g. ``dymu evaluate --reference-point``).
    """
    if benchmark not in REFERENCE_POINTS:
        raise ValueError(
            f"no reference point for benchmark {benchmark!r} (known: "
            f"{', '.join(REFERENCE_POINTS)}); pass one explicitly"
        )
    table, default = REFERENCE_POINTS[benchmark].values, _DEFAULT_VALUE.get(benchmark)
    missing = [t for t in tasks if t not in table and default is None]
    if missing:
        raise ValueError(
            f"the {benchmark} reference point has no value for task(s) {missing}; "
            "pass one explicitly"
        )
    return [float(table.get(t, default)) for t in tasks]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hypervolume:
    """A hypervolume and how it was computed."""

    value: float
    exact: bool
    method: str
    n_points: int
    n_inside: int  # points that strictly dominate the reference point (the others add nothing)


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray,
    reference: Sequence[float],
    *,
    exact_max_objectives: int = EXACT_MAX_OBJECTIVES,
    samples: int = APPROX_SAMPLES,
    seed: int = APPROX_SEED,
) -> Hypervolume:
    """Hypervolume of loss vectors ``points`` (minimized) against ``reference`` (App. J, eq. 10).

    ``HV(S) = λ({a : ∃ b ∈ S, b ⪯ a ⪯ p})``. Points that do not strictly dominate the reference
    point bound no volume and are dropped first. Exact (``moocore.hypervolume``) for at most
    ``exact_max_objectives`` objectives, else ``moocore.hv_approx`` with the deterministic
    :data:`APPROX_METHOD` and a fixed ``samples`` count (``exact=False`` in the result).
    """
    import moocore

    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, ref.size)
    if pts.ndim != 2 or pts.shape[1] != ref.size:
        raise ValueError(
            f"points must be (n, {ref.size}) for a {ref.size}-objective reference point, "
            f"got shape {pts.shape}"
        )
    if not (np.isfinite(ref).all() and np.isfinite(pts).all()):
        raise ValueError("hypervolume needs finite points and a finite reference point")
    m = ref.size
    exact = m <= exact_max_objectives
    method = (
        "moocore.hypervolume (exact)"
        if exact
        else (f"moocore.hv_approx ({APPROX_METHOD}, {samples} samples; approximate)")
    )
    inside = pts[(pts < ref).all(axis=1)]
    if len(inside) == 0:
        value = 0.0
    elif exact:
        value = float(moocore.hypervolume(inside, ref=ref))
    else:
        value = float(
            moocore.hv_approx(inside, ref=ref, nsamples=samples, seed=seed, method=APPROX_METHOD)
        )
    return Hypervolume(value, exact, method, len(pts), len(inside))


def uniformity(r: Sequence[float], losses: Sequence[float]) -> float:
    """``μ_r = 1 − KL(L̂ ‖ 1/N)`` with ``L̂_j = r_j L_j / Σ_i r_i L_i`` (paper §4.1).

    ``KL(L̂ ‖ u) = Σ_j L̂_j log(N L̂_j)`` (natural log; terms with ``L̂_j = 0`` are 0). It is 1
    exactly when every ``r_j L_j`` is the same (the loss vector is aligned with the preference:
    ``r_j ∝ 1 / L_j``) and falls as the weighted losses spread. ``r`` is normalized onto the
    simplex; losses must be non-negative with ``Σ_i r_i L_i > 0``.
    """
    r_ = np.asarray(r, dtype=np.float64).reshape(-1)
    l_ = np.asarray(losses, dtype=np.float64).reshape(-1)
    if r_.shape != l_.shape or r_.size == 0:
        raise ValueError(f"r and losses must have the same length, got {r_.size} and {l_.size}")
    if (r_ < 0).any() or (l_ < 0).any() or not (np.isfinite(r_).all() and np.isfinite(l_).all()):
        raise ValueError("uniformity needs finite, non-negative r and losses")
    weighted = r_ / r_.sum() * l_
    total = weighted.sum()
    if total <= 0:
        raise ValueError("uniformity needs Σ_i r_i L_i > 0")
    hat = weighted / total
    nz = hat > 0
    kl = float((hat[nz] * np.log(hat[nz] * r_.size)).sum())
    return 1.0 - kl


def uniformity_reach(
    r: Sequence[float], low: Sequence[float], high: Sequence[float], steps: int = 11
) -> tuple[float, float]:
    """The (lowest, highest) :func:`uniformity` at ``r`` over losses ``L_j`` anywhere between
    ``low_j`` and ``high_j``, each task on its own, on a grid of ``steps`` points per task.

    Uniformity is not monotone in any one loss (raising ``L_j`` helps while ``r_j L_j`` is below
    the others' and hurts after), so the box is searched, not its corners. docs/results-training.md
    (row 63) uses it for the reach of the BN deltas: each loss between the adapted and the
    unadapted model's, on the same tree.
    """
    lo = np.asarray(low, dtype=np.float64).reshape(-1)
    hi = np.asarray(high, dtype=np.float64).reshape(-1)
    if lo.shape != hi.shape or steps < 2:
        raise ValueError("low and high must have the same length, and steps must be >= 2")
    t = np.linspace(0.0, 1.0, steps)
    grid = itertools.product(t, repeat=lo.size)
    values = [uniformity(r, lo + np.array(point) * (hi - lo)) for point in grid]
    return min(values), max(values)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ between ``x`` and ``y``; None where either is constant (no ranking) or the
    statistic is not finite. Claim 2 reads ρ(r_i, w_i L_i) over a method's preferences."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """The percentile bootstrap interval of ``statistic(indices)`` over ``n`` preferences.

    Each resample draws ``n`` preference indices with replacement (scipy.stats.bootstrap) and
    ``statistic`` computes its number from those preferences' points, so everything measured at
    one preference (its c = 0 and c = 1 points, two methods at the same r) is resampled
    together. How far the number moves when other preferences had been drawn is what decides
    whether a claim that compares it with 0 is a tie. None when there are fewer than 3
    preferences or the statistic is undefined on too many resamples (e.g. constant losses).
    """
    from scipy.stats import bootstrap

    if n < 3:
        return None

    def stat(idx: np.ndarray) -> float:
        value = statistic(np.asarray(idx, dtype=np.int64))
        return float("nan") if value is None else float(value)

    # a constant statistic (a perfect rank order on every resample) is a valid answer here, not
    # the "degenerate data" scipy warns about
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap(
            (np.arange(n),),
            stat,
            vectorized=False,
            n_resamples=resamples,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if not (math.isfinite(lo) and math.isfinite(hi)) else (lo, hi)


def _constant_predictor_losses(benchmark: str) -> dict[str, float]:
    """w_i × the loss of the best image-independent prediction on the benchmark's held-out split
    (how the reference points of the project's benchmarks were measured)."""
    import torch

    from ..config import load_config
    from ..data import collate, split_dataset
    from ..tasks import task_loss

    config = load_config({"scenes": "scenes-small"}.get(benchmark, benchmark))
    data = split_dataset(config, held_out=True)
    batch = collate([data[i] for i in range(len(data))])
    out = {}
    for t in data.tasks:
        y = batch[t.name]
        if t.kind in ("segmentation", "classification"):
            labels = y[y != (t.ignore_index if t.ignore_index is not None else -1)].long()
            prior = torch.bincount(labels, minlength=t.out_channels).double() / labels.numel()
            shape = (1, t.out_channels) + (() if t.kind == "classification" else (1, 1))
            pred = prior.clamp_min(1e-12).log().reshape(shape).expand(y.shape[0], -1, *y.shape[1:])
        elif t.kind == "depth":
            valid = (y != 0) & torch.isfinite(y)
            pred = torch.full_like(y, float(y[valid].median()))
        elif t.kind == "normals":
            valid = (y != 0).any(1, keepdim=True)
            mean = (y * valid).sum((0, 2, 3))
            pred = (mean / mean.norm()).reshape(1, 3, 1, 1).expand_as(y).contiguous()
        else:  # binary: the positive rate
            p = float(y[torch.isfinite(y)].mean())
            pred = torch.full_like(y, math.log(p / (1 - p)))
        out[t.name] = float(task_loss(t, pred.double(), y)) * t.loss_scale
    return out


if __name__ == "__main__":  # pragma: no cover - documentation of the reference points
    import sys

    for name in sys.argv[1:] or ["scenes", "multidigits"]:
        print(name, {k: round(v, 4) for k, v in _constant_predictor_losses(name).items()})
