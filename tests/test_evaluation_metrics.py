"""Hypervolume and uniformity (training.evaluation.metrics) against hand-computed values and an
independent exact implementation (inclusion–exclusion over subsets)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from training.evaluation.metrics import (
    EXACT_MAX_OBJECTIVES,
    REFERENCE_POINTS,
    bootstrap_interval,
    hypervolume,
    reference_point,
    spearman,
    uniformity,
    uniformity_reach,
)


def hv_inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """HV = Σ_{S ≠ ∅} (−1)^{|S|+1} Π_k (ref_k − max_{p ∈ S} p_k)_+ (exact, exponential in |S|)."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(ref - corner, 0, None)))
    return total


STAIRCASE = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]


def test_staircase_2d():
    # columns [1,2) x 1, [2,3) x 2, [3,4) x 3 under the reference (4, 4): 1 + 2 + 3
    hv = hypervolume(STAIRCASE, [4, 4])
    assert hv.value == pytest.approx(6.0, abs=1e-12)
    assert hv.exact and hv.n_points == 3 and hv.n_inside == 3


def test_dominated_point_adds_nothing():
    assert hypervolume([*STAIRCASE, [3.0, 3.0], [2.0, 2.5]], [4, 4]).value == pytest.approx(6.0)


def test_point_beyond_reference_adds_nothing():
    # beyond in one objective (even if far better in the other), or exactly on the boundary
    hv = hypervolume([*STAIRCASE, [5.0, 0.0], [0.5, 4.0]], [4, 4])
    assert hv.value == pytest.approx(6.0)
    assert hv.n_inside == 3
    assert hypervolume([[5.0, 5.0]], [4, 4]).value == 0.0
    assert hypervolume(np.zeros((0, 2)), [4, 4]).value == 0.0


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_random_fronts_match_inclusion_exclusion(m):
    rng = np.random.default_rng(m)
    for _ in range(5):
        pts = rng.uniform(0, 1, size=(int(rng.integers(1, 8)), m))
        ref = np.full(m, 1.1)
        got = hypervolume(pts, ref)
        assert got.exact
        assert got.value == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=1e-9, abs=1e-12)


def test_approximation_beyond_ten_objectives_is_close_deterministic_and_labelled():
    m = EXACT_MAX_OBJECTIVES + 2
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 0.6, size=(6, m))
    ref = np.ones(m)
    first, second = hypervolume(pts, ref), hypervolume(pts, ref)
    assert not first.exact and "approximate" in first.method
    assert first.value == second.value  # fixed sample count and method: repeatable
    assert first.value == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=0.02)
    assert hypervolume(pts[:, :EXACT_MAX_OBJECTIVES], ref[:EXACT_MAX_OBJECTIVES]).exact


def test_hypervolume_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        hypervolume([[1.0, 2.0]], [3, 3, 3])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[math.nan, 1.0]], [3, 3])


def test_uniformity_is_one_exactly_when_weighted_losses_are_equal():
    assert uniformity([0.5, 0.25, 0.25], [1.0, 2.0, 2.0]) == 1.0
    assert uniformity([1, 1, 1, 1], [0.3] * 4) == 1.0
    assert uniformity([2.0, 1.0], [1.0, 2.0]) == 1.0  # r is normalized first
    assert uniformity([0.5, 0.5], [1.0, 1.001]) < 1.0


def test_uniformity_hand_value():
    # L̂ = (0.25, 0.75): KL(L̂ || 1/2) = 0.25 ln 0.5 + 0.75 ln 1.5
    want = 1 - (0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert uniformity([0.5, 0.5], [1.0, 3.0]) == pytest.approx(want, rel=1e-12)
    # all weight on one task: L̂ one-hot, KL = ln N, the minimum 1 - ln N
    assert uniformity([1.0, 0.0, 0.0], [0.2, 5.0, 5.0]) == pytest.approx(1 - math.log(3))


def test_uniformity_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        uniformity([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        uniformity([0.5, 0.5], [-1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        uniformity([1.0, 0.0], [0.0, 1.0])


def test_reference_points_follow_task_order_and_explain_themselves():
    assert reference_point("scenes", ["normals", "segmentation"]) == [
        REFERENCE_POINTS["scenes"].values["normals"],
        REFERENCE_POINTS["scenes"].values["segmentation"],
    ]
    assert reference_point("cifar100-20", [f"t{i}" for i in range(20)]) == [1.0] * 20
    assert all(p.why for p in REFERENCE_POINTS.values())
    with pytest.raises(ValueError, match="no reference point for benchmark"):
        reference_point("mnist", ["a"])
    with pytest.raises(ValueError, match="no value for task"):
        reference_point("scenes", ["segmentation", "edges"])


def test_uniformity_reach_of_a_point_is_its_uniformity():
    u = uniformity([0.6, 0.4], [1.0, 3.0])
    assert uniformity_reach([0.6, 0.4], [1.0, 3.0], [1.0, 3.0]) == pytest.approx((u, u))


def test_uniformity_reach_searches_inside_the_box():
    # r = (0.5, 0.5): uniformity is 1 where L_1 = L_2. The box [1, 2] x [1.5, 1.5] holds that
    # point (L_1 = 1.5) only inside, at t = 0.5; both corners are below 1.
    lo, hi = uniformity_reach([0.5, 0.5], [1.0, 1.5], [2.0, 1.5], steps=11)
    assert hi == pytest.approx(1.0)
    corners = [uniformity([0.5, 0.5], [x, 1.5]) for x in (1.0, 2.0)]
    assert max(corners) < 0.999
    assert lo == pytest.approx(min(corners))


def test_uniformity_reach_rejects_mismatched_bounds():
    with pytest.raises(ValueError, match="same length"):
        uniformity_reach([0.5, 0.5], [1.0, 1.0], [1.0, 1.0, 1.0])


# -- the claims' bootstrap intervals ----------------------------------------------------------
def _points(rs, losses):
    from training.evaluation.loop import Point

    names = ["a", "b"]
    return [
        Point(list(r), 0.0, dict(zip(names, row, strict=True)), {}, 0, 0)
        for r, row in zip(rs, losses, strict=True)
    ]


def test_spearman_ranks_and_gives_none_where_nothing_can_be_ranked():
    r = [0.1, 0.4, 0.2, 0.9]
    assert spearman(r, [5.0, 2.0, 4.0, 1.0]) == pytest.approx(-1.0)  # loss falls as r rises
    assert spearman(r, [1.0, 30.0, 2.0, 40.0]) == pytest.approx(1.0)  # ranks, not values
    assert spearman(r, [1.0, 3.0, 2.0, 2.5]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman(r, [2.0, 2.0, 2.0, 2.0]) is None  # one tree for every r: no ranking
    assert spearman([0.5] * 4, [1.0, 2.0, 3.0, 4.0]) is None


def test_bootstrap_interval_resamples_preferences_with_a_fixed_seed():
    x = np.random.default_rng(1).normal(5.0, 1.0, 40)
    seen = []

    def mean(idx):
        seen.append(len(idx))
        return float(x[idx].mean())

    lo, hi = bootstrap_interval(mean, 40)
    assert set(seen) == {40}  # every resample draws all 40 preferences (with replacement)
    half = 1.96 * x.std() / math.sqrt(40)  # the normal approximation of the mean's interval
    assert lo < x.mean() < hi and (hi - lo) == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_interval(lambda idx: float(x[idx].mean()), 40) == (lo, hi)  # reproducible
    assert bootstrap_interval(lambda idx: None, 40) is None  # undefined statistic
    assert bootstrap_interval(mean, 2) is None


def test_rho_interval_keeps_a_preferences_two_points_together():
    from training.evaluation.report import rho_intervals

    rng = np.random.default_rng(0)
    r0 = rng.uniform(0.05, 0.95, 30)
    rs = [(a, 1 - a) for a in r0]
    # each loss falls strictly with its own weight at both c: rho is -1 on every resample
    falls = [(1 - a, a) for a in r0]
    ci = rho_intervals(_points(rs, falls), _points(rs, falls), "ab")
    assert ci["a"] == pytest.approx((-1.0, -1.0)) and ci["b"] == pytest.approx((-1.0, -1.0))
    noise = rng.uniform(0, 1, (30, 2))
    ci = rho_intervals(_points(rs, noise), _points(rs, noise[::-1]), "ab")
    assert all(lo < 0 < hi for lo, hi in ci.values())


def test_uniformity_margin_interval_pairs_the_two_rows():
    from training.evaluation.report import margin_interval

    rng = np.random.default_rng(2)
    r0 = rng.uniform(0.05, 0.95, 40)
    rs = [(a, 1 - a) for a in r0]
    theirs = _points(rs, rng.uniform(0.1, 2.0, (40, 2)))  # uniformities spread widely
    # ours: r_j L_j equal at every preference (uniformity 1), so ours wins at each one
    ours = _points(rs, [(1 / a, 1 / (1 - a)) for a in r0])
    lo, hi = margin_interval(ours, theirs, "ab")
    diffs = [1 - uniformity(p.r, p.vector("ab")) for p in theirs]
    assert min(diffs) > 0 and 0 < lo < np.mean(diffs) < hi
    # the same row against itself: a margin of exactly 0 on every resample (a test that
    # resampled the rows independently would give a wide interval here)
    assert margin_interval(theirs, theirs, "ab") == (0.0, 0.0)
